"""Strategies' plans, the aggregate contract, and their runs on a tiny model."""
import copy
import dataclasses
import json

import pytest
import torch

from testbed.comm.transport import Failure
from testbed.core.config import from_dict
from testbed.core.plan import LayerProbe, Update
from testbed.core.state import GlobalState
from testbed.experiments.run import run_inprocess
from testbed.experiments.setup import setup
from testbed.model.tiny import tiny_config
from testbed.server.admission import check_update
from testbed.server.loop import initial_state, make_strategy
from testbed.server.strategies import STRATEGIES
from testbed.server.strategies.hetlora import pow2_floor


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


def equal(a, b) -> bool:
    """Deep equality, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and equal(vars(a), vars(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_aggregate_returns_the_new_state_and_changes_none_of_its_inputs(tiny_bert, name):
    """The round loop owns the global state: a strategy's aggregate leaves the state, the updates
    and the failures it is given as they were, and returns a new state: each trained layer averaged
    over the devices that sent it (by samples), and the head averaged over every update."""
    exp = setup(from_dict(tiny_config(tiny_bert, **{"strategy.name": name})))
    strategy = make_strategy(exp)
    state = initial_state(exp, strategy)
    plans = strategy.plan(0, list(exp.devices), state)
    updates = []
    for i, (d, plan) in enumerate(plans.items()):  # device i sends every tensor filled with i + 1
        lora = {l: {n: torch.full_like(t, i + 1.0) for n, t in ts.items()}
                for l, ts in state.downlink(plan, 2).items() if l in plan.shared(2)}
        head = {n: torch.full_like(t, i + 1.0) for n, t in state.head.items()}
        units = 2 * (2 if plan.probe_blocks else 1)  # a plan may ask for the device's probe (FedPruner's)
        probe = LayerProbe([[1.0] * units] * units, {"loss": [0.1] * units, "cosine": [0.1] * units},
                           plan.probe_blocks) if plan.probe_rows else None
        u = Update(d, 0, lora, head, samples=10 * (i + 1), active_steps=dict.fromkeys(plan.resident(2), 3), steps=3,
                   loss=1.0, probe=probe)
        assert check_update(u, plan, exp.info, state.head, len(exp.data.shards[d].train)) is None
        updates.append(u)
    failures = [Failure(0, "jetson-tx2-9", "timeout", "no answer")]
    before = copy.deepcopy((state, updates, failures))
    new = strategy.aggregate(0, updates, failures, state)
    assert equal((state, updates, failures), before)
    assert isinstance(new, GlobalState) and new is not state
    weights = sum(u.samples for u in updates)
    head = sum(u.samples * (i + 1.0) for i, u in enumerate(updates)) / weights
    assert all(torch.allclose(t, torch.full_like(t, head)) for t in new.head.values())
    for l in range(2):
        sent = [(u.samples, i + 1.0) for i, u in enumerate(updates) if l in u.lora]
        if not sent:
            assert all(torch.equal(new.lora[l][n], t) for n, t in state.lora[l].items())
        elif strategy.rule() == "fedavg":  # the weighted mean
            mean = sum(w * v for w, v in sent) / sum(w for w, _ in sent)
            assert all(torch.allclose(t, torch.full_like(t, mean)) for t in new.lora[l].values())
        else:  # another rule: at least a changed layer
            assert any(not torch.equal(new.lora[l][n], t) for n, t in state.lora[l].items())
