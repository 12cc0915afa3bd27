"""LEGEND's configurator: the paper's structure by default (the deepest top layers that meet the
deadline, ranks ramped toward the output, no LoRA below), and the older rule as options."""
import json

import pytest

from testbed.core.config import from_dict
from testbed.core.plan import Plan
from testbed.experiments.run import run_inprocess
from testbed.experiments.setup import setup
from testbed.measure.memory import MIB
from testbed.model.tiny import save_tiny_bert, tiny_config
from testbed.server.loop import initial_state, make_strategy
from testbed.server.strategies.base import base_plan
from testbed.server.strategies.legend import (baseline_seconds, candidates,
                                              ramp, ramps, round_deadline,
                                              structure)

DEVICES = {"agx-orin": 1, "xavier-nx": 1, "jetson-tx2": 1}


@pytest.fixture(scope="module")
def bert6(tmp_path_factory) -> str:
    """A 6-layer tiny BERT: room for several depths and a ramp with steps between its ends."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-6"), layers=6)


def legend(model: str, **overrides):
    """The experiment and strategy of a LEGEND config; long rounds, so that compute sets the
    deadline (the TX2's baseline round by default)."""
    raw = tiny_config(model, **{"strategy.name": "legend", "model.lora.rank": 8, "train.local_steps": 500,
                                "strategy.deadline_device": "jetson-tx2", "devices": DEVICES, **overrides})
    exp = setup(from_dict(raw))
    return exp, make_strategy(exp)


def top(plan: Plan, n: int) -> list[int]:
    """The ranks of the plan's LoRA layers, the lowest first."""
    return [plan.ranks[l] for l in plan.trained(n)]


@pytest.mark.parametrize("depth", range(1, 7))
@pytest.mark.parametrize("low, high", [(2, 8), (1, 16), (4, 4), (3, 4)])
def test_a_ramp_rises_from_its_low_end_to_its_high_end(depth, low, high):
    ranks = ramp(depth, low, high)
    assert len(ranks) == depth and ranks == sorted(ranks) and ranks[-1] == high
    if depth > 1:
        assert ranks[0] == low and (low == high or ranks[0] < ranks[-1])
    assert all(r & (r - 1) == 0 for r in ranks[1:-1])  # powers of two between the ends


def test_the_deepest_full_ramp_that_meets_the_deadline_a_slower_device_shallower(bert6):
    exp, strategy = legend(bert6, **{"strategy.deadline_factor": 0.85})
    names, n = list(exp.devices), 6
    deadline = round_deadline(strategy.ctx, names)
    plans = strategy.plan(0, names, initial_state(exp, strategy))
    depth = {name: len(p.trained(n)) for name, p in plans.items()}
    for name, plan in plans.items():
        device, d = exp.devices[name], depth[name]
        assert exp.cost.fits(device, plan) and exp.cost.round_seconds(device, plan) <= deadline
        ranks = top(plan, n)
        assert ranks == ramp(d, 2, 8) and ranks == sorted(ranks) and (d == 1 or ranks[0] < ranks[-1])
        # No LoRA below the depth: rank 0, nothing frozen, nothing sent down.
        assert plan.trained(n) == list(range(n - d, n)) and not plan.frozen
        assert all(plan.ranks[l] == 0 for l in range(n - d)) and plan.downlink(n) == plan.trained(n)
        if d < n:  # the deepest: one layer more at the full ramp misses the deadline
            assert exp.cost.round_seconds(device, structure(strategy.ctx, ramp(d + 1, 2, 8))) > deadline
    by_speed = sorted(names, key=baseline_seconds(strategy.ctx, names).get)  # the fastest first
    assert [depth[d] for d in by_speed] == sorted(depth.values(), reverse=True)
    assert depth["agx-orin-0"] == n > depth["jetson-tx2-0"]
    # The AGX Orin could run the baseline in time; it runs the paper's structure instead.
    baseline = base_plan(exp.cfg, dict.fromkeys(range(n), 8))
    assert exp.cost.round_seconds(exp.devices["agx-orin-0"], baseline) <= deadline
    assert plans["agx-orin-0"].ranks != baseline.ranks


def test_a_device_too_slow_for_the_full_ramp_at_min_depth_gets_its_ranks_halved(bert6):
    exp, strategy = legend(bert6, **{"strategy.min_depth": 2})
    assert ramps(strategy.ctx) == [(2, 8), (1, 4), (1, 2), (1, 1)]
    tx2 = exp.devices["jetson-tx2-0"]
    full, half = (structure(strategy.ctx, ramp(2, low, high)) for low, high in ((2, 8), (1, 4)))
    seconds = [exp.cost.round_seconds(tx2, p) for p in (full, half)]
    assert seconds[1] < seconds[0]
    plan = strategy.configure("jetson-tx2-0", sum(seconds) / 2)
    assert plan.ranks == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 4}  # still a ramp, at min_depth


def test_memory_bounds_the_depth(bert6):
    exp, strategy = legend(bert6, **{"strategy.deadline_factor": 2.0})  # every plan meets it: memory decides
    tx2 = exp.devices["jetson-tx2-0"]
    peak = {d: exp.cost.peak_memory_bytes(tx2, structure(strategy.ctx, ramp(d, 2, 8))) for d in (3, 4)}
    assert peak[3] < peak[4]
    tx2.memory_mb = (peak[3] + peak[4]) / 2 / MIB
    plans = strategy.plan(0, list(exp.devices), initial_state(exp, strategy))
    assert top(plans["jetson-tx2-0"], 6) == ramp(3, 2, 8) and exp.cost.fits(tx2, plans["jetson-tx2-0"])
    assert len(plans["agx-orin-0"].trained(6)) == 6


def test_a_shallow_device_receives_and_sends_only_its_lora_layers(tiny_bert, tmp_path):
    raw = tiny_config(tiny_bert, rounds=1, **{"strategy.name": "legend", "strategy.deadline_factor": 0.95,
                                              "strategy.deadline_device": "jetson-tx2", "train.local_steps": 500,
                                              "devices": {"agx-orin": 1, "jetson-tx2": 1}})
    exp = setup(from_dict(raw))
    strategy = make_strategy(exp)
    plan = strategy.plan(0, list(exp.devices), initial_state(exp, strategy))["jetson-tx2-0"]
    assert plan.trained(2) == [1] and plan.ranks[0] == 0
    run_inprocess(from_dict(raw), tmp_path, quiet=True)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    device = {d["device"]: d for d in row["devices"]}
    assert device["jetson-tx2-0"]["layers"] == 1 and device["agx-orin-0"]["layers"] == 2
    # What went down was the plan's, without layer 0's LoRA (the cost model's bytes are exact but
    # for a few header bytes).
    layer0 = exp.cost.bytes_down(Plan(ranks={0: 4, 1: plan.ranks[1]})) - exp.cost.bytes_down(plan)
    assert abs(device["jetson-tx2-0"]["bytes_down"] - exp.cost.bytes_down(plan)) < layer0 / 10


def test_the_largest_sum_of_ranks_with_choose_ranks(tiny_bert):
    """`choose: ranks` and `below: frozen`, the earlier default: the plan with the most LoRA
    parameters that meets the deadline, the baseline wherever it does, the global LoRA frozen
    below a shallower depth."""
    exp, strategy = legend(tiny_bert, **{"strategy.choose": "ranks", "strategy.below": "frozen",
                                         "strategy.deadline_factor": 0.95})
    deadline = round_deadline(strategy.ctx, list(exp.devices))
    plans = strategy.plan(0, list(exp.devices), initial_state(exp, strategy))
    full = base_plan(exp.cfg, dict.fromkeys(range(2), 8))

    def capacity(p: Plan) -> tuple[int, int]:
        trained = p.trained(2)
        return sum(p.ranks[l] for l in trained), len(trained)

    shallow = 0
    for name, device in exp.devices.items():
        seconds = exp.cost.round_seconds(device, plans[name])
        if exp.cost.round_seconds(device, full) <= deadline:  # the baseline fits: run it unchanged
            assert plans[name].ranks == full.ranks and not plans[name].frozen
            continue
        shallow += 1
        assert seconds <= deadline and plans[name].frozen == list(range(min(plans[name].trained(2))))
        richer = [c for c in candidates(strategy.ctx) if capacity(c) > capacity(plans[name])]
        assert richer and all(exp.cost.round_seconds(device, c) > deadline for c in richer)
    assert shallow == 1  # the TX2 must cut a twentieth of its round


def test_below_frozen_runs_the_global_lora_frozen_below_the_depth(tiny_bert):
    exp, strategy = legend(tiny_bert, **{"strategy.below": "frozen", "strategy.deadline_factor": 0.95,
                                         "devices": {"agx-orin": 1, "jetson-tx2": 1}})
    state = initial_state(exp, strategy)
    shallow = strategy.plan(0, list(exp.devices), state)["jetson-tx2-0"]
    assert shallow.frozen and set(shallow.frozen) == set(range(min(shallow.trained(2))))
    assert exp.cost.bytes_down(shallow) > exp.cost.bytes_down(Plan(ranks={1: shallow.ranks[1]}))
    assert sorted(state.downlink(shallow, 2)) == [0, 1] and shallow.shared(2) == [1]
