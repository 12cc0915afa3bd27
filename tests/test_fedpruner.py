"""FedPruner: CKA, grouping, selection, and runs with memory-budget submodels."""
import dataclasses
import json

import pytest
import torch

from testbed.core.config import from_dict
from testbed.core.plan import LayerProbe, Plan, Update
from testbed.experiments.run import run_inprocess
from testbed.experiments.setup import setup
from testbed.measure.probe import linear_cka
from testbed.model.lora import get_head
from testbed.model.tiny import tiny_config
from testbed.server.admission import check_update
from testbed.server.loop import initial_state, make_strategy
from testbed.server.strategies.fedpruner import (contiguous_groups,
                                                 graph_groups, mean_probe)


def test_linear_cka_properties():
    """On representations whose features are far from centred, as a layer's outputs are: only a
    CKA that centres them finds a shifted copy the same and unrelated ones unrelated."""
    g = torch.Generator().manual_seed(0)
    mean = 4.0 + torch.randn(16, generator=g)
    x = mean + torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-4)  # rotation and scale invariant
    assert linear_cka(x, x + 2.0 * mean) == pytest.approx(1.0, abs=1e-4)  # and shift invariant
    assert linear_cka(x, mean + torch.randn(200, 16, generator=g)) < 0.2


CKA = [[1.0, 0.9, 0.3, 0.2],
       [0.9, 1.0, 0.4, 0.2],
       [0.3, 0.4, 1.0, 0.8],
       [0.2, 0.2, 0.8, 1.0]]


def test_contiguous_groups_cut_where_layers_differ():
    assert contiguous_groups(CKA, 2) == [[0, 1], [2, 3]]
    assert contiguous_groups(CKA, 1) == [[0, 1, 2, 3]]
    assert contiguous_groups(CKA, 4) == [[0], [1], [2], [3]]


def test_graph_groups_cluster_similar_layers():
    cka = [[1.0, 0.1, 0.9], [0.1, 1.0, 0.2], [0.9, 0.2, 1.0]]
    assert graph_groups(cka, 2) == [[0, 2], [1]]
    assert sorted(sum(graph_groups(CKA, 3), [])) == [0, 1, 2, 3]


@pytest.mark.parametrize("selection, grouping, importance", [
    ("importance", "contiguous", "loss"), ("sampled", "graph", "cosine"), ("random", "contiguous", "loss")])
def test_pruned_devices_hold_and_send_less(tiny_bert, tmp_path, selection, grouping, importance):
    raw = tiny_config(tiny_bert, rounds=2, **{"strategy.name": "fedpruner"})
    exp = setup(from_dict(raw))
    one = exp.cost.peak_memory_bytes(exp.devices["laptop-0"], Plan(ranks={1: 4}, layers=[1], batch_size=8))
    both = exp.cost.peak_memory_bytes(exp.devices["laptop-0"], Plan(ranks={0: 4, 1: 4}, batch_size=8))
    raw["devices"] = {"laptop": 1, "jetson-tx2": {"count": 1, "memory_mb": (one + both) / 2 / 2**20}}
    raw["strategy"].update(selection=selection, grouping=grouping, importance=importance)
    summary = run_inprocess(from_dict(raw), tmp_path, quiet=True)
    assert summary["failures"] == [] and summary["final_accuracy"] is not None
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        full, pruned = (next(d for d in r["devices"] if d["device"] == name) for name in ("laptop-0", "jetson-tx2-0"))
        assert full["layers"] == 2 and pruned["layers"] == 1
        assert pruned["peak_train_mem_mb"] < full["peak_train_mem_mb"]
        assert pruned["bytes_up"] < 0.7 * full["bytes_up"]


def test_mean_probe_weighs_devices_by_samples():
    a = LayerProbe([[1.0, 0.0], [0.0, 1.0]], {"loss": [1.0, 0.0], "cosine": [0.0, 0.0]})
    b = LayerProbe([[1.0, 1.0], [1.0, 1.0]], {"loss": [0.0, 1.0], "cosine": [1.0, 1.0]})
    m = mean_probe([(30, a), (10, b)])
    assert m.cka == [[1.0, 0.25], [0.25, 1.0]] and m.importance == {"loss": [0.75, 0.25], "cosine": [0.25, 0.25]}


def units_of(plan: Plan) -> int:
    return sum(1 if l in plan.blocks else 2 for l in plan.resident(2))


def test_fine_plans_keep_blocks_and_layers_are_averaged_where_their_attention_ran(tiny_bert, tmp_path):
    raw = tiny_config(tiny_bert, rounds=1, **{"strategy.name": "fedpruner_fine"})
    exp = setup(from_dict(raw))
    dev = exp.devices["laptop-0"]
    whole = exp.cost.peak_memory_bytes(dev, Plan(ranks={0: 4, 1: 4}, batch_size=8))
    three = exp.cost.peak_memory_bytes(dev, Plan(ranks={0: 4, 1: 4}, blocks={0: "attn"}, batch_size=8))
    assert three < whole
    raw["devices"] = {"laptop": 1, "jetson-tx2": {"count": 2, "memory_mb": (three + whole) / 2 / 2**20}}
    cfg = from_dict(raw)
    exp = setup(cfg)
    strategy = make_strategy(exp)
    state = initial_state(exp, strategy)
    plans = strategy.plan(0, list(exp.devices), state)  # what the run will plan: same seed, same probe
    assert units_of(plans["laptop-0"]) == 4 and plans["laptop-0"].blocks == {}
    for name in ("jetson-tx2-0", "jetson-tx2-1"):
        plan = plans[name]
        assert units_of(plan) == 3 and exp.cost.fits(exp.devices[name], plan)
        assert all(plan.ranks.get(l, 0) == (4 if plan.block(l) != "ffn" else 0) for l in plan.resident(2))
    assert any(p.block(l) == "ffn" for p in plans.values() for l in p.resident(2))
    # each layer is averaged over the devices whose plans ran (and so trained) its attention
    updates, head = [], get_head(exp.bb)
    for i, (d, plan) in enumerate(plans.items()):
        lora = {l: {n: torch.full_like(t, i + 1.0) for n, t in ts.items()}
                for l, ts in state.downlink(plan, 2).items()}
        u = Update(d, 0, lora, head, samples=10 * (i + 1), active_steps=dict.fromkeys(plan.resident(2), 3), steps=3,
                   loss=1.0)
        assert check_update(u, plan, exp.info, head, len(exp.data.shards[d].train)) is None
        updates.append(u)
    state = strategy.aggregate(0, updates, [], state)
    for l in range(2):
        held = [(u.samples, i + 1.0) for i, u in enumerate(updates) if l in u.lora]
        mean = sum(w * v for w, v in held) / sum(w for w, _ in held)
        assert all(torch.allclose(t, torch.full_like(t, mean)) for t in state.lora[l].values())
    summary = run_inprocess(cfg, tmp_path, quiet=True)
    assert summary["failures"] == []
    devices = {d["device"]: d for d in json.loads((tmp_path / "metrics.jsonl").read_text())["devices"]}
    assert devices["jetson-tx2-0"]["peak_train_mem_mb"] < devices["laptop-0"]["peak_train_mem_mb"]
    assert {d: exp.cost.bytes_up(p) for d, p in plans.items()} == pytest.approx(
        {d: devices[d]["bytes_up"] for d in plans}, abs=16)


def test_devices_probe_their_own_data_and_the_server_never_does(tiny_bert, tmp_path, monkeypatch):
    import testbed.server.loop

    monkeypatch.setattr(testbed.server.loop, "server_probe", lambda *a: pytest.fail("the server probed"))
    raw = tiny_config(tiny_bert, rounds=3, **{"strategy.name": "fedpruner_fine", "strategy.cka": "device",
                                              "strategy.regroup_every": 2, "strategy.probe_rows": 8})
    cfg = from_dict(raw)
    exp = setup(cfg)
    summary = run_inprocess(cfg, tmp_path, quiet=True)
    assert summary["failures"] == [] and summary["final_accuracy"] is not None
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    strategy = make_strategy(exp)
    plans = strategy.plan(0, list(exp.devices), initial_state(exp, strategy))
    for d in rows[0]["devices"]:  # round 0 probes: charged on the modelled clock, sent with the update
        plan, device = plans[d["device"]], exp.devices[d["device"]]
        assert plan.probe_rows == 8 and plan.probe_blocks
        assert d["clock_s"] == pytest.approx(exp.cost.round_seconds(device, plan))
        plain = dataclasses.replace(plan, probe_rows=0)
        probe_s = exp.cost.probe_seconds(device, plan)
        sent = (exp.cost.bytes_up(plan) - exp.cost.bytes_up(plain)) * 8 / (device.bandwidth_mbit * 1e6)
        assert exp.cost.round_seconds(device, plan) - exp.cost.round_seconds(device, plain) == pytest.approx(probe_s + sent)
        by_layer = exp.cost.probe_seconds(device, dataclasses.replace(plan, probe_blocks=False))
        prof = exp.cost.profile  # a pass with every unit, then one without each: by blocks, one more per layer
        whole = (prof.embed_s + sum(prof.forward_frozen_s)) * 8 / (prof.batch_size * prof.seq_len / cfg.model.max_length)
        assert probe_s - by_layer == pytest.approx(exp.info.num_layers * whole / device.speed)
        assert d["bytes_up"] == pytest.approx(exp.cost.bytes_up(plan), abs=16)
        assert d["bytes_up"] - exp.cost.bytes_up(plain) >= 8 * (4 * 4 + 2 * 4)
    probe = torch.load(tmp_path / "checkpoint.pt")["strategy"]["probe"]
    assert probe["blocks"] and len(probe["cka"]) == 4 and len(probe["importance"]["loss"]) == 4
    assert rows[1]["bytes_up"] < rows[0]["bytes_up"]  # round 1 does not probe (regroup_every: 2)
