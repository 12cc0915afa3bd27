"""The adaptive strategy: plans within memory and the deadline, pruned submodels, the bandit, resume."""
import json

import pytest
import torch

from testbed.core.config import from_dict
from testbed.core.errors import TestbedError
from testbed.core.plan import Plan, Report
from testbed.experiments.run import run_inprocess
from testbed.experiments.runs import strip_wall
from testbed.experiments.setup import setup
from testbed.model.tiny import tiny_config
from testbed.server.loop import initial_state, make_strategy
from testbed.server.strategies.legend import (baseline_seconds, candidates,
                                              round_deadline)
from tests.helpers import write_proxy

DEVICES = {"agx-orin": 1, "xavier-nx": 1, "jetson-tx2": 1}


def adaptive(model: str, **overrides):
    """A config, its experiment, the strategy and its initial state; long rounds, so that compute
    sets the deadline."""
    raw = tiny_config(model, **{"strategy.name": "adaptive", "model.lora.rank": 8, "train.local_steps": 5000,
                                "strategy.drops": [0.0, 0.25, 0.5], "strategy.deadline_device": "jetson-tx2",
                                "strategy.full_arm": False, "devices": DEVICES, **overrides})
    exp = setup(from_dict(raw))
    strategy = make_strategy(exp)
    return raw, exp, strategy, initial_state(exp, strategy)


def level(plan: Plan) -> float:
    return max(plan.drop.values(), default=0.0)


@pytest.mark.parametrize("factor, tx2_drop", [(0.92, 0.0), (0.9, 0.25)])
def test_each_device_gets_the_most_capacity_that_fits_and_meets_the_deadline(tiny_bert, factor, tx2_drop):
    _, exp, strategy, state = adaptive(tiny_bert, **{"strategy.factors": [factor]})
    names = list(exp.devices)
    plans = strategy.plan(0, names, state)
    deadline = round_deadline(strategy.ctx, names, validate=True) * factor  # the plans validate: charged
    for name, plan in plans.items():
        seconds = strategy.cost_of(name, plan)
        assert exp.cost.fits(exp.devices[name], plan) and seconds <= deadline
        key = (*strategy.capacity(plan), -level(plan))  # the most capacity, then the least dropout
        for p in strategy.space(name):
            assert strategy.cost_of(name, p) > deadline or (*strategy.capacity(p), -level(p)) <= key
    assert strategy.probe is None  # every device fits a plan over all layers: the server probed nothing
    full = {0: 8, 1: 8}
    assert plans["agx-orin-0"].ranks == full and not plans["agx-orin-0"].drop  # the baseline meets it unchanged
    tx2 = plans["jetson-tx2-0"]  # only the layer below its depth, which runs frozen, may be dropped
    assert tx2.trained(2) == [1] and tx2.frozen == [0] and level(tx2) == tx2_drop and 1 not in tx2.drop


@pytest.mark.parametrize("proxy", [True, False])
def test_a_memory_starved_device_trains_a_pruned_submodel_that_fits(tiny_bert, tmp_path, proxy):
    _, exp, strategy, state = adaptive(tiny_bert, **({"data.proxy_file": write_proxy(tmp_path / "proxy.csv", 1)}
                                                     if proxy else {}))
    tx2 = exp.devices["jetson-tx2-0"]
    lightest = min(exp.cost.peak_memory_bytes(tx2, c) for c in candidates(strategy.ctx))
    one = max(exp.cost.peak_memory_bytes(tx2, Plan(ranks={l: 8}, layers=[l], batch_size=8)) for l in (0, 1))
    assert one < lightest
    tx2.memory_mb = (one + lightest) / 2 / 2**20
    plan = strategy.plan(0, list(exp.devices), state)["jetson-tx2-0"]
    assert len(plan.layers) == 1 and plan.trained(2) == plan.layers and exp.cost.fits(tx2, plan)
    if proxy:  # the layer was chosen on the server's probe of its proxy set
        assert strategy.probe is not None and strategy.probed == 0
    else:  # at random: the server holds no rows to probe on
        assert strategy.ctx.probe is None and strategy.probe is None
    assert all(p.layers is None for d, p in strategy.plans.items() if d != "jetson-tx2-0")


def test_bad_options_are_config_errors(tiny_bert):
    for key, value in (("strategy.drops", [0.0, 1.0]), ("strategy.factors", [])):
        with pytest.raises(TestbedError, match=key):
            adaptive(tiny_bert, **{key: value})


def reports(plans: dict, accuracy: float, **fields) -> dict[str, Report]:
    """Every device saw the global model at `accuracy` on its validation split before training."""
    return {d: Report(val_accuracy_before=accuracy, **fields) for d in plans}


@pytest.mark.parametrize("gains, best", [({1.0: 0.02, 0.8: 0.02}, 0.8), ({1.0: 0.02, 0.8: 0.0}, 1.0)])
def test_the_bandit_follows_the_validation_progress_per_second(tiny_bert, gains, best):
    """Synthetic feedback: the deadline factor whose rounds gain more validation accuracy per second
    wins; the test metrics, which say the opposite, are not read."""
    _, exp, strategy, state = adaptive(tiny_bert, **{"strategy.factors": [1.0, 0.8]})
    names, accuracy, picks = list(exp.devices), 0.3, []
    for r in range(16):
        plans = strategy.plan(r, names, state)
        assert all(p.validate for p in plans.values())
        picks.append(strategy.opts.factors[strategy.arm])
        strategy.observe(r, reports(plans, accuracy), {"accuracy": 1.0 - accuracy, "loss": accuracy})
        accuracy += gains[picks[-1]]  # what this round's aggregate shows on the next round's validation
    assert picks[-8:].count(best) >= 7
    # The choice is the plans': under the tighter deadline the TX2 drops layers to meet it.
    assert bool(strategy.plan(16, names, state)["jetson-tx2-0"].drop) == (best < 1)


def test_a_round_is_credited_when_the_next_round_validates_its_aggregate(tiny_bert):
    _, exp, strategy, state = adaptive(tiny_bert, **{"strategy.factors": [1.0, 0.8]})
    names = list(exp.devices)
    plans = strategy.plan(0, names, state)
    arm, seconds = strategy.arm, max(strategy.cost_of(d, p) for d, p in plans.items())
    strategy.observe(0, reports(plans, 0.3), {})  # the initial model: nothing to credit yet
    assert sum(strategy.bandit.counts) == 0
    plans = strategy.plan(1, names, state)
    before = {d: Report(val_accuracy_before=a) for d, a in zip(plans, (0.4, 0.5, 0.8))}
    strategy.observe(1, before, {"accuracy": 0.99})
    samples = strategy.ctx.samples  # devices weigh by their samples
    value = sum(samples[d] * before[d].val_accuracy_before for d in plans) / sum(samples[d] for d in plans)
    assert strategy.bandit.counts[arm] == 1 and sum(strategy.bandit.counts) == 1
    assert strategy.bandit.sums[arm] == pytest.approx((value - 0.3) / seconds)


def test_once_the_gain_flattens_every_device_runs_the_baseline_if_it_can(tiny_bert):
    _, exp, strategy, state = adaptive(tiny_bert, **{"strategy.relax": 0.25, "strategy.factors": [0.9]})
    names, full = list(exp.devices), {0: 8, 1: 8}
    # A flat start (noise: no round has gained a quarter of the headroom, 0.75, yet), then gains of
    # 0.25, 0.1, and 0.04 < 0.25 x 0.25.
    for r, accuracy in enumerate([0.25, 0.255, 0.25, 0.5, 0.6, 0.64]):
        plans = strategy.plan(r, names, state)
        assert plans["jetson-tx2-0"].trained(2) != [0, 1]
        strategy.observe(r, reports(plans, accuracy), {})
        assert strategy.relaxed == (r == 5)
    counts = list(strategy.bandit.counts)
    plans = strategy.plan(6, names, state)
    assert all(p.ranks == full and not p.frozen and not p.drop and not p.validate for p in plans.values())
    strategy.observe(6, reports(plans, 0.9), {})
    assert strategy.bandit.counts == counts  # no arm decides a relaxed round, so none is credited


def test_the_full_arm_is_fedloras_round(tiny_bert):
    _, exp, strategy, state = adaptive(tiny_bert, **{"strategy.factors": [0.9], "strategy.full_arm": True})
    names, arms = list(exp.devices), []
    slowest = max(baseline_seconds(strategy.ctx, names, validate=True).values())  # its devices validate
    for r in range(3):  # untried arms first (a round's arm is credited a round later, so one may repeat)
        plans = strategy.plan(r, names, state)
        arms.append(strategy.arm)
        baseline = all(p.trained(2) == [0, 1] and p.ranks == {0: 8, 1: 8} and not p.drop for p in plans.values())
        assert baseline == (strategy.arm == 1)  # arm 1, the full arm: every device runs FedLoRA's plan
        if baseline:
            assert max(strategy.cost_of(d, p) for d, p in plans.items()) == pytest.approx(slowest)
        strategy.observe(r, reports(plans, 0.3), {})
    assert set(arms) == {0, 1}


def test_a_memory_starved_run_resumes_exactly(tiny_bert, tmp_path):
    """A pruned TX2 in a bandit-driven run: 2 rounds, resumed to 4, equals 4 rounds straight."""
    raw, exp, strategy, _ = adaptive(tiny_bert, rounds=4, **{"strategy.factors": [1.0, 0.9], "train.local_steps": 3})
    tx2 = exp.devices["jetson-tx2-0"]
    lightest = min(exp.cost.peak_memory_bytes(tx2, c) for c in candidates(strategy.ctx))
    raw["devices"] = {**DEVICES, "jetson-tx2": {"count": 1, "memory_mb": (lightest - 2**14) / 2**20}}
    whole = run_inprocess(from_dict(raw), tmp_path / "whole", quiet=True)
    run_inprocess(from_dict({**raw, "rounds": 2}), tmp_path / "cut", quiet=True)
    run_inprocess(from_dict(raw), tmp_path / "cut", quiet=True, resume=True)
    rows = [json.loads(l) for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert strip_wall(cut) == strip_wall(rows) and whole["failures"] == []
    for r in rows:
        device = {d["class"]: d for d in r["devices"]}
        assert device["jetson-tx2"]["layers"] == 1 and device["agx-orin"]["layers"] == 2
        assert device["jetson-tx2"]["peak_train_mem_mb"] < device["agx-orin"]["peak_train_mem_mb"]
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("cut", "whole"))
    keys = ("bandit", "pending", "last", "best_gain", "headroom", "relaxed")
    assert {k: a["strategy"][k] for k in keys} == {k: b["strategy"][k] for k in keys}
    # Rounds 0-2 are credited when rounds 1-3 validate their aggregates (until the gain flattens).
    assert 1 <= sum(b["strategy"]["bandit"]["counts"]) <= 3
