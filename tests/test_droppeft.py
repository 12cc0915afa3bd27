"""DropPEFT: layer dropout in training, the bandit, personal layers."""
import dataclasses
import io
import json
import random

import numpy as np
import pytest
import torch

from testbed.agent.trainer import train_plan
from testbed.core.config import LoraConfig, ModelConfig, TrainConfig, from_dict
from testbed.core.errors import TestbedError
from testbed.core.plan import Plan, Report
from testbed.data import Split, tokenize
from testbed.experiments import setup as experiment_setup
from testbed.experiments.run import run_inprocess
from testbed.model.info import model_info
from testbed.model.load import load_backbone
from testbed.model.lora import init_lora
from testbed.model.tiny import save_tiny_bert, tiny_config
from testbed.server.bandit import Bandit
from testbed.server.loop import initial_state, make_strategy
from testbed.server.strategies.droppeft import DropPEFT


@pytest.fixture(scope="module")
def setup(tiny_bert):
    bb = load_backbone(ModelConfig(name=tiny_bert, lora=LoraConfig(rank=4, alpha=8)), 4, seed=0)
    tokens = tokenize(bb.tokenizer, Split(["a b c d e f g"] * 32, [0, 1, 2, 3] * 8), 32)
    return bb, tokens, {n: p.detach().clone() for n, p in bb.head_params().items()}


def train(setup, drop, steps=4, max_active=0):
    bb, tokens, head = setup
    info = model_info(bb)
    lora = init_lora(info, [0, 1], 4, seed=0)
    lora = {l: {n: t + 0.01 for n, t in ts.items()} for l, ts in lora.items()}  # B != 0: gradients reach A
    plan = Plan(ranks={0: 4, 1: 4}, drop=drop, local_steps=steps, batch_size=16, max_active=max_active)
    res = train_plan(bb, plan, lora, head, tokens, list(range(32)), LoraConfig(rank=4, alpha=8),
                     TrainConfig(lr=1e-2), seed=1)
    return lora, res


def test_a_dropped_layer_gets_no_gradient_and_stores_nothing(setup):
    lora, never = train(setup, {0: 1.0})
    assert never.active_steps == {0: 0, 1: 4}
    for name, t in lora[0].items():
        assert torch.equal(never.lora[0][name], t), name  # untouched
    assert any(not torch.equal(never.lora[1][n], t) for n, t in lora[1].items())
    _, full = train(setup, {})
    _, half = train(setup, {0: 0.5, 1: 0.5}, steps=8)
    assert never.footprint_mb < full.footprint_mb
    assert 0 < sum(half.active_steps.values()) < 16


def test_layer_dropout_is_seeded(setup):
    _, a = train(setup, {0: 0.5, 1: 0.5}, steps=8)
    _, b = train(setup, {0: 0.5, 1: 0.5}, steps=8)
    assert a.active_steps == b.active_steps and a.loss == b.loss


def test_a_step_runs_at_most_max_active_layers(setup):
    _, full = train(setup, {}, steps=8)
    _, capped = train(setup, {}, steps=8, max_active=1)
    assert sum(capped.active_steps.values()) == 8 and min(capped.active_steps.values()) > 0
    assert capped.footprint_mb < full.footprint_mb


def test_running_probability_under_a_cap_matches_sampling():
    plan = Plan(ranks={}, drop={0: 0.5, 1: 0.2, 3: 0.7}, max_active=2)
    rng, counts, trials = random.Random(0), [0] * 4, 40000
    for _ in range(trials):
        drawn = [l for l in range(4) if rng.random() >= plan.drop.get(l, 0.0)]
        for l in rng.sample(drawn, min(len(drawn), 2)):
            counts[l] += 1
    predicted = plan.running(4)
    assert all(abs(predicted[l] - counts[l] / trials) < 0.01 for l in range(4)), (predicted, counts)
    assert Plan(ranks={}, drop={0: 0.5}).running(2) == {0: 0.5, 1: 1.0}  # uncapped: 1 - drop


@pytest.fixture(scope="module")
def bert4(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("bert4"), layers=4)


def test_a_memory_tight_device_runs_capped_dropout_that_fits(bert4, tmp_path):
    """Counted footprints on this setup: about 3.9 MB plus 2.8 MB per running layer (15.1 MB for
    all four); an 11 MB budget affords two.  FedLoRA runs out of memory there, DropPEFT does not."""
    devices = {"laptop": 1, "jetson-tx2": {"count": 1, "memory_mb": 11}}
    raw = tiny_config(bert4, devices=devices, **{"model.max_length": 64, "train.batch_size": 16})
    base = run_inprocess(from_dict(raw), tmp_path / "fedlora", quiet=True)
    assert {(f["device"], f["kind"]) for f in base["failures"]} == {("jetson-tx2-0", "oom")}
    raw["strategy"] = {"name": "droppeft"}
    summary = run_inprocess(from_dict(raw), tmp_path / "droppeft", quiet=True)
    assert summary["failures"] == []
    rows = [json.loads(l) for l in (tmp_path / "droppeft" / "metrics.jsonl").read_text().splitlines()]
    tx2 = [d for r in rows for d in r["devices"] if d["device"] == "jetson-tx2-0"]
    assert len(tx2) == 2 and all(d["max_active"] == 2 and d["peak_train_mem_mb"] <= 11 for d in tx2)
    assert all("max_active" not in d for r in rows for d in r["devices"] if d["device"] == "laptop-0")


@pytest.mark.parametrize("policy", ["ucb1", "epsilon", "thompson"])
def test_bandit_finds_the_best_arm(policy):
    bandit, rng = Bandit(3, policy, epsilon=0.1), random.Random(0)
    means = [0.1, 0.5, 0.3]
    picks = []
    for _ in range(300):
        arm = bandit.select(rng, [0, 1, 2])
        bandit.update(arm, rng.gauss(means[arm], 0.1))
        picks.append(arm)
    assert picks[-100:].count(1) > 60


def test_bandit_only_picks_allowed_arms():
    bandit, rng = Bandit(4), random.Random(0)
    for _ in range(20):
        arm = bandit.select(rng, [1, 3])
        assert arm in (1, 3)
        bandit.update(arm, 1.0)


def test_droppeft_run_keeps_personal_layers_home(tiny_bert, tmp_path):
    cfg = from_dict(tiny_config(tiny_bert, rounds=3, **{"strategy.name": "droppeft", "strategy.personal_k": 1}))
    summary = run_inprocess(cfg, tmp_path / "drop", quiet=True)
    base = run_inprocess(from_dict(tiny_config(tiny_bert, rounds=3)), tmp_path / "base", quiet=True)
    rows = [json.loads(l) for l in (tmp_path / "drop" / "metrics.jsonl").read_text().splitlines()]
    assert all(d["layers"] == 2 for r in rows for d in r["devices"])
    assert summary["bytes_up"] < 0.7 * base["bytes_up"]  # one of two layers never travels
    assert summary["final_personal_accuracy"] is not None and rows[-1]["personal_accuracy"] is not None
    state = torch.load(tmp_path / "drop" / "checkpoint.pt")["lora"]
    assert all(torch.count_nonzero(t) == 0 for n, t in state[1].items() if n.endswith(".B"))  # never aggregated


def test_unknown_arm_shape_is_a_config_error(tiny_bert, tmp_path):
    cfg = from_dict(tiny_config(tiny_bert, **{"strategy.name": "droppeft", "strategy.shapes": ["zigzag"]}))
    with pytest.raises(TestbedError, match="strategy.shapes"):
        run_inprocess(cfg, tmp_path, quiet=True)


@pytest.mark.parametrize("straggler", ["pace", "clamp", "none"])
def test_only_dropout_that_shortens_the_round_is_run(tiny_bert, straggler):
    raw = tiny_config(tiny_bert, **{"strategy.name": "droppeft", "strategy.straggler": straggler,
                                    "train.local_steps": 5000, "devices": {"agx-orin": 1, "jetson-tx2": 1}})
    exp = experiment_setup.setup(from_dict(raw))
    strategy = make_strategy(exp)
    state = initial_state(exp, strategy)
    agx, tx2 = exp.devices["agx-orin-0"], exp.devices["jetson-tx2-0"]
    drops = []
    for r in range(len(strategy.arms)):  # no feedback: the bandits keep trying untried arms, at random
        plans = strategy.plan(r, list(exp.devices), state)
        arms = {g.key: g.arm for g in strategy.groups}
        assert strategy.arms.index(plans["jetson-tx2-0"].drop) == arms["jetson-tx2"]
        drops.append(sum(plans["agx-orin-0"].drop.values()))
        # the AGX Orin finishes long before the TX2 at any arm: its dropout would buy nothing
        assert exp.cost.round_seconds(agx, plans["agx-orin-0"]) < exp.cost.round_seconds(tx2, plans["jetson-tx2-0"])
    assert (max(drops) == 0) == (straggler != "none")


@pytest.fixture(scope="module")
def synthetic(bert4):
    """A set-up to drive DropPEFT with synthetic reports: long rounds, so that compute sets them; the
    TX2s are the round's stragglers, the Xavier NX between them and the AGX Orin."""
    raw = tiny_config(bert4, **{"strategy.name": "droppeft", "train.local_steps": 5000,
                                "devices": {"jetson-tx2": 2, "xavier-nx": 1, "agx-orin": 1}})
    return experiment_setup.setup(from_dict(raw))


def droppeft(exp, seed: int = 0, clock: str = "modelled", **options) -> DropPEFT:
    cfg = dataclasses.replace(exp.cfg, seed=seed, clock=clock,
                              strategy=dataclasses.replace(exp.cfg.strategy, **options))
    return make_strategy(dataclasses.replace(exp, cfg=cfg))


def synthetic_reports(exp, round: int, plans: dict[str, Plan], noise: random.Random) -> dict[str, Report]:
    """Each device gains validation accuracy in proportion to its round's seconds (relative to the
    same plan without dropout) at a rate that peaks at mean dropout 0.4: that arm gains the most per
    second, not per round (less dropout gains about as much or more).  The gains shrink as the run
    converges, differ by device (their data) and are noisy."""
    n = exp.info.num_layers
    reports = {}
    for i, (name, plan) in enumerate(sorted(plans.items())):
        device = exp.devices[name]
        full = dataclasses.replace(plan, drop={}, max_active=0)
        relative = exp.cost.round_seconds(device, plan) / exp.cost.round_seconds(device, full)
        rate = np.interp(sum(plan.drop.values()) / n, [0.0, 0.2, 0.4, 0.6], [1.0, 1.05, 1.25, 1.05])
        gain = 0.1 * 0.9 ** round * (0.8 + 0.1 * i) * rate * relative * noise.gauss(1.0, 0.1)
        reports[name] = Report(val_accuracy_before=0.5, val_accuracy=0.5 + float(gain))
    return reports


def drive(exp, strategy: DropPEFT, rounds: range, seed: int = 0) -> list[dict[str, Plan]]:
    """Plan and observe `rounds` on synthetic reports (their noise seeded by `seed` and the round)."""
    runs = []
    for r in rounds:
        plans = strategy.plan(r, list(exp.devices), None)
        strategy.observe(r, synthetic_reports(exp, r, plans, random.Random(seed * 1000 + r)), {})
        runs.append(plans)
    return runs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bandit_learns_the_arm_with_the_most_gain_per_second(synthetic, seed):
    """20 rounds: from round 10 the stragglers run the best arm in at least 7 rounds of 10 (over
    seeds 0-29: 6 to 10, at least 7 in 29).  The former DropPEFT (the round's seconds for every
    device less the round's mean, seven arms, a bandit per device, the former clamp) ran it in
    0 to 3."""
    strategy = droppeft(synthetic, seed)
    best = strategy.arms.index(dict.fromkeys(range(synthetic.info.num_layers), 0.4))
    picks = [strategy.arms.index(plans["jetson-tx2-0"].drop) for plans in drive(synthetic, strategy, range(20), seed)]
    assert picks[10:].count(best) >= 7, picks


@pytest.mark.parametrize("clock", ["modelled", "wall"])
def test_a_group_is_charged_its_own_seconds_at_the_reference_speed(synthetic, clock):
    """The stragglers' gain per second of their slowest device: its predicted round (modelled) or
    its measured compute (wall), times its speed."""
    strategy = droppeft(synthetic, clock=clock, reward_baseline="none")
    plans = strategy.plan(0, list(synthetic.devices), None)
    tx2 = {d: synthetic.devices[d] for d in plans if d.startswith("jetson-tx2")}
    reports = {d: Report(val_accuracy_before=0.5, val_accuracy=0.5 + 0.01 * i, compute_s=30.0 + i)
               for i, d in enumerate(plans)}
    strategy.observe(0, reports, {})
    seconds = {d: (synthetic.cost.round_seconds(device, plans[d]) if clock == "modelled" else reports[d].compute_s)
               * device.speed for d, device in tx2.items()}
    gain = sum(reports[d].val_accuracy - 0.5 for d in tx2) / len(tx2)
    bandit = strategy.bandits["jetson-tx2"]
    assert sum(bandit.counts) == 1
    assert bandit.sums[bandit.counts.index(1)] == pytest.approx(gain / max(seconds.values()))


@pytest.mark.parametrize("straggler", ["pace", "clamp"])
def test_a_bandit_is_credited_with_the_arm_its_group_ran(synthetic, straggler, monkeypatch):
    """Under `pace` only the stragglers' bandit picks, and the others run the least dropout within
    its round; under `clamp` every bandit picks and the clamp overrides the AGX Orin's picks.  Either
    way each bandit is credited once a round, with the arm its devices ran."""
    picked = {}
    select = Bandit.select
    monkeypatch.setattr(Bandit, "select", lambda b, rng, allowed: picked.setdefault(id(b), select(b, rng, allowed)))
    strategy, overridden = droppeft(synthetic, straggler=straggler), 0
    for r in range(8):
        picked.clear()
        before = {k: list(b.counts) for k, b in strategy.bandits.items()}
        plans = drive(synthetic, strategy, range(r, r + 1))[0]
        for key, bandit in strategy.bandits.items():
            ran = {strategy.arms.index(p.drop) for d, p in plans.items() if synthetic.devices[d].device_class == key}
            assert len(ran) == 1  # a class's devices run one arm
            arm = ran.pop()
            counts = before.get(key, [0] * len(strategy.arms))
            counts[arm] += 1
            assert bandit.counts == counts
            overridden += id(bandit) in picked and picked[id(bandit)] != arm
        choosing = {k for k, b in strategy.bandits.items() if id(b) in picked}
        assert choosing == ({"jetson-tx2"} if straggler == "pace" else set(strategy.bandits))
    assert (overridden > 0) == (straggler == "clamp")


def test_the_bandits_resume_from_their_state(synthetic):
    strategy = droppeft(synthetic)
    drive(synthetic, strategy, range(6))
    saved = io.BytesIO()
    torch.save(strategy.state_dict(), saved)  # as a checkpoint keeps it
    saved.seek(0)
    state = torch.load(saved, weights_only=False)
    resumed = droppeft(synthetic)
    resumed.load_state_dict(state)
    assert drive(synthetic, resumed, range(6, 12)) == drive(synthetic, strategy, range(6, 12))
    assert resumed.state_dict() == strategy.state_dict()
