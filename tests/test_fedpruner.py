"""FedPruner: CKA, grouping, selection, and runs with memory-budget submodels."""
import json

import pytest
import torch

from testbed.config import from_dict
from testbed.experiment import setup
from testbed.plan import Plan
from testbed.probe import linear_cka
from testbed.run import run_inprocess
from testbed.strategies.fedpruner import contiguous_groups, graph_groups
from tests.conftest import tiny_config


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-4)  # rotation and scale invariant
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.2


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
