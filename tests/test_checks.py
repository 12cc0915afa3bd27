"""Updates are admitted only if they are exactly what their plan asked for."""
import json

import pytest
import torch

from testbed.comm.wire import (WireError, pack, read_update, unpack,
                               update_message)
from testbed.core.config import from_dict
from testbed.core.plan import LayerProbe, Plan, Update
from testbed.experiments.run import run_inprocess
from testbed.experiments.setup import setup
from testbed.model.lora import get_head, init_lora
from testbed.model.tiny import tiny_config
from testbed.server.admission import check_update

PLAN = Plan(ranks={0: 4, 1: 2}, local_steps=3)


@pytest.fixture(scope="module")
def exp(tiny_bert):
    return setup(from_dict(tiny_config(tiny_bert)))


def good(exp) -> Update:
    lora = {0: init_lora(exp.info, [0], 4, seed=0)[0], 1: init_lora(exp.info, [1], 2, seed=0)[1]}
    return Update("laptop-0", 0, lora, get_head(exp.bb), samples=10, active_steps={0: 3, 1: 2}, steps=3, loss=1.0)


def check(exp, u: Update, plan: Plan = PLAN) -> str | None:
    return check_update(u, plan, exp.info, get_head(exp.bb), shard_size=10)


def test_a_faithful_update_is_admitted(exp):
    assert check(exp, good(exp)) is None


def test_every_kind_of_unfaithful_update_is_refused_with_its_reason(exp):
    u = good(exp)
    assert "not asked for" in check(exp, u, Plan(ranks={0: 4, 1: 2}, personal=[1], local_steps=3))
    name = next(iter(u.lora[0]))
    cases = []
    wrong_rank = good(exp)
    wrong_rank.lora[0][name] = torch.zeros(8, wrong_rank.lora[0][name].shape[1])
    cases.append((wrong_rank, "shape"))
    nan = good(exp)
    nan.lora[1][name][0, 0] = float("nan")
    cases.append((nan, "NaN or Inf"))
    inf_head = good(exp)
    next(iter(inf_head.head.values()))[0] = float("inf")
    cases.append((inf_head, "NaN or Inf"))
    missing = good(exp)
    del missing.lora[0][name]
    cases.append((missing, "instead of"))
    inflated = good(exp)
    inflated.samples = 10_000
    cases.append((inflated, "samples"))
    steps = good(exp)
    steps.active_steps[0] = 7
    cases.append((steps, "step counts"))
    for bad, reason in cases:
        problem = check(exp, bad)
        assert problem is not None and reason in problem, (reason, problem)


def test_probes_come_exactly_when_asked_for_and_whole(exp):
    probing = Plan(ranks={0: 4, 1: 2}, local_steps=3, probe_rows=8)
    u = good(exp)
    assert "lacks the probe" in check(exp, u, probing)
    u.probe = LayerProbe([[1.0, 0.5], [0.5, 1.0]], {"loss": [0.1, 0.2], "cosine": [0.3, 0.4]})
    assert check(exp, u, probing) is None
    assert "did not ask" in check(exp, u)
    assert "wrong units" in check(exp, u, Plan(ranks={0: 4, 1: 2}, local_steps=3, probe_rows=8, probe_blocks=True))
    u.probe.importance["loss"][1] = float("nan")
    assert "NaN" in check(exp, u, probing)


def test_integer_tensors_are_refused_on_the_wire(exp):
    u = good(exp)
    u.head = {k: v.long() for k, v in u.head.items()}
    with pytest.raises(WireError, match="not floating point"):
        read_update(unpack(pack(update_message(u, 1), b"k" * 32), b"k" * 32))


def test_a_poisoned_update_is_left_out_and_recorded(tiny_bert, tmp_path, monkeypatch):
    """One device returns NaN factors every round: the run finishes on the others, failures say why."""
    from testbed.agent.agent import Agent

    honest = Agent.run

    def poisoned(self, round, job):
        update = honest(self, round, job)
        if self.device == "laptop-1":
            for tensors in update.lora.values():
                for t in tensors.values():
                    t.fill_(float("nan"))
        return update

    monkeypatch.setattr(Agent, "run", poisoned)
    summary = run_inprocess(from_dict(tiny_config(tiny_bert, rounds=2)), tmp_path, quiet=True)
    rejected = [f for f in summary["failures"] if f["kind"] == "rejected"]
    assert [f["device"] for f in rejected] == ["laptop-1", "laptop-1"] and "NaN" in rejected[0]["detail"]
    assert summary["final_accuracy"] is not None
    state = torch.load(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(t).all() for ts in state["lora"].values() for t in ts.values())
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("laptop-1" not in {d["device"] for d in r["devices"]} for r in rows)
