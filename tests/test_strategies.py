"""Strategies' plans and their runs on a tiny model."""
import json

import pytest
import torch

from testbed.core.config import from_dict
from testbed.core.plan import Plan
from testbed.experiments.run import run_inprocess
from testbed.experiments.setup import setup
from testbed.model.tiny import tiny_config
from testbed.server.loop import make_strategy
from testbed.server.strategies.hetlora import pow2_floor
from testbed.server.strategies.legend import rank_distribution


@pytest.mark.parametrize("depth", range(1, 7))
@pytest.mark.parametrize("low, high", [(2, 8), (1, 16), (4, 4)])
def test_legend_ranks_are_non_decreasing_toward_the_output(depth, low, high):
    ranks = rank_distribution(depth, 6, low, high, "ramp")
    lora = [r for r in ranks.values() if r]
    assert len(lora) == depth and all(r == 0 for l, r in ranks.items() if l < 6 - depth)
    assert lora == sorted(lora) and lora[-1] == high and min(lora) >= 1
    assert all(r & (r - 1) == 0 for r in lora)  # powers of two


def test_pow2_floor():
    assert [pow2_floor(x) for x in (0.5, 1, 1.9, 2, 7.9, 8, 15)] == [1, 1, 1, 2, 4, 8, 8]


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_heterogeneous_ranks_follow_device_speed(tiny_bert, tmp_path, name):
    cfg = from_dict(tiny_config(tiny_bert, **{"strategy.name": name, "model.lora.rank": 8,
                                              "devices": {"agx-orin": 1, "jetson-tx2": 1}}))
    run_inprocess(cfg, tmp_path, quiet=True)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    up = {d["device"]: d["bytes_up"] for d in rows[0]["devices"]}
    assert up["agx-orin-0"] > 2 * up["jetson-tx2-0"]  # rank 8 vs rank 2
    state = torch.load(tmp_path / "checkpoint.pt")["lora"]
    for name, t in state[0].items():  # the global state stays at the largest rank
        assert (t.shape[0] if name.endswith(".A") else t.shape[1]) == 8


def test_backprop_stops_at_the_lowest_lora_layer(tiny_bert):
    """LEGEND's depth: layers below the lowest LoRA layer store nothing for backward."""
    from testbed.agent.trainer import train_plan
    from testbed.core.config import LoraConfig, ModelConfig, TrainConfig
    from testbed.core.plan import Plan
    from testbed.data import Split, tokenize
    from testbed.model.info import model_info
    from testbed.model.load import load_backbone
    from testbed.model.lora import init_lora

    bb = load_backbone(ModelConfig(name=tiny_bert, lora=LoraConfig(rank=4, alpha=8)), 4, seed=0)
    info = model_info(bb)
    tokens = tokenize(bb.tokenizer, Split(["a b c d e f"] * 32, [0, 1, 2, 3] * 8), 64)  # activations dominate
    footprint = {}
    for depth in (2, 1):
        ranks = {l: (4 if l >= 2 - depth else 0) for l in range(2)}
        lora = init_lora(info, [l for l, r in ranks.items() if r], 4, seed=0)
        res = train_plan(bb, Plan(ranks=ranks, local_steps=2, batch_size=32), lora,
                         {n: p.detach().clone() for n, p in bb.head_params().items()}, tokens, list(range(32)),
                         LoraConfig(rank=4, alpha=8), TrainConfig(), seed=0)
        footprint[depth] = res.footprint_mb
        assert sorted(res.lora) == [l for l, r in ranks.items() if r]
    assert footprint[1] < footprint[2] * 0.8
    # Depth 1 with layer 0's global LoRA running frozen: it stores no more for backward than
    # depth 1 alone (only layer 0's small factors are added), and layer 0 comes back unchanged.
    lora = init_lora(info, [0, 1], 4, seed=0)
    lora[0] = {n: t + 0.1 for n, t in lora[0].items()}  # a non-zero global adapter
    res = train_plan(bb, Plan(ranks={0: 4, 1: 4}, frozen=[0], local_steps=2, batch_size=32), lora,
                     {n: p.detach().clone() for n, p in bb.head_params().items()}, tokens, list(range(32)),
                     LoraConfig(rank=4, alpha=8), TrainConfig(), seed=0)
    assert footprint[1] < res.footprint_mb < footprint[1] + 0.01 < footprint[2] * 0.8
    assert all(torch.equal(res.lora[0][n], lora[0][n]) for n in lora[0])
    assert not all(torch.equal(res.lora[1][n], lora[1][n]) for n in lora[1])


def test_legend_gives_each_device_the_most_capacity_that_meets_the_deadline(tiny_bert):
    cfg = from_dict(tiny_config(tiny_bert, **{"strategy.name": "legend", "model.lora.rank": 8,
                                              "train.local_steps": 500, "strategy.deadline_device": "jetson-tx2",
                                              "strategy.deadline_factor": 0.95,
                                              "devices": {"agx-orin": 1, "xavier-nx": 1, "jetson-tx2": 1}}))
    exp = setup(cfg)
    strategy = make_strategy(exp)
    deadline = strategy.deadline(list(exp.devices))
    plans = strategy.plan(0, list(exp.devices))
    full = strategy.base_plan(dict.fromkeys(range(2), 8))

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
        assert seconds <= deadline
        richer = [c for c in strategy.candidates() if capacity(c) > capacity(plans[name])]
        assert richer and all(exp.cost.round_seconds(device, c) > deadline for c in richer)
    assert shallow == 1  # the TX2 must cut a twentieth of its round


def test_legend_runs_the_global_lora_frozen_below_its_depth(tiny_bert, tmp_path):
    cfg = from_dict(tiny_config(tiny_bert, **{"strategy.name": "legend", "strategy.deadline_factor": 0.95,
                                              "strategy.deadline_device": "jetson-tx2", "train.local_steps": 500,
                                              "devices": {"agx-orin": 1, "jetson-tx2": 1}}))
    exp = setup(cfg)
    strategy = make_strategy(exp)
    plans = strategy.plan(0, list(exp.devices))
    shallow = plans["jetson-tx2-0"]
    assert shallow.frozen and set(shallow.frozen) == set(range(min(shallow.trained(2))))
    assert exp.cost.bytes_down(shallow) > exp.cost.bytes_down(Plan(ranks={1: shallow.ranks[1]}))
    assert sorted(strategy.state.downlink(shallow, 2)) == [0, 1] and shallow.shared(2) == [1]
