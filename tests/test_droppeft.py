"""DropPEFT: layer dropout in training, the bandit, personal layers."""
import json
import random

import pytest
import torch

from testbed.agent.trainer import train_plan
from testbed.core.config import LoraConfig, ModelConfig, TrainConfig, from_dict
from testbed.core.errors import TestbedError
from testbed.core.plan import Plan
from testbed.data import Split, tokenize
from testbed.experiments import setup as experiment_setup
from testbed.experiments.run import run_inprocess
from testbed.model.info import model_info
from testbed.model.load import load_backbone
from testbed.model.lora import init_lora
from testbed.model.tiny import save_tiny_bert, tiny_config
from testbed.server.bandit import Bandit
from testbed.server.loop import initial_state, make_strategy


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


@pytest.mark.parametrize("straggler", ["clamp", "none"])
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
        assert strategy.arms.index(plans["jetson-tx2-0"].drop) == strategy.chosen["jetson-tx2-0"]
        drops.append(sum(plans["agx-orin-0"].drop.values()))
        # the AGX Orin finishes long before the TX2 at any arm: its dropout would buy nothing
        assert exp.cost.round_seconds(agx, plans["agx-orin-0"]) < exp.cost.round_seconds(tx2, plans["jetson-tx2-0"])
    assert (max(drops) == 0) == (straggler == "clamp")
