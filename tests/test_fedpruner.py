"""FedPruner: CKA, grouping, selection, runs with memory-budget submodels, and who probes on
which rows (the devices on their own; the server only on a public proxy set)."""
import dataclasses
import json

import pytest
import torch

from testbed.core.config import DataConfig, from_dict
from testbed.agent.agent import Agent
from testbed.core.errors import OutOfMemory, TestbedError
from testbed.core.options import FedPrunerOptions
from testbed.core.plan import BOTH, Job, LayerProbe, Plan, Update
from testbed.data import load_splits
from testbed.experiments.run import run_inprocess
from testbed.experiments.setup import check_inputs, setup
from testbed.measure.probe import linear_cka, probe_layers
from testbed.model.lora import get_head
from testbed.model.tiny import tiny_config
from testbed.server.admission import check_update
from testbed.server.costmodel import REFERENCE_GFLOPS
from testbed.server.loop import initial_state, make_strategy
from testbed.server.strategies.fedpruner import (contiguous_groups,
                                                 graph_groups, mean_probe)
from tests.helpers import proxy_rows, write_proxy


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


@pytest.mark.parametrize("selection, grouping, importance, cka", [
    ("importance", "contiguous", "loss", "device"), ("importance", "contiguous", "loss", "server"),
    ("sampled", "graph", "cosine", "device"), ("random", "contiguous", "loss", "device")])
def test_pruned_devices_hold_and_send_less(tiny_bert, tmp_path, selection, grouping, importance, cka):
    raw = tiny_config(tiny_bert, rounds=2, **{"strategy.name": "fedpruner", "strategy.cka": cka})
    if cka == "server":
        raw["data"]["proxy_file"] = write_proxy(tmp_path / "proxy.csv", 1)
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
    probe = torch.load(tmp_path / "checkpoint.pt")["strategy"]["probe"]  # the devices' or the server's
    assert (probe is None) == (selection == "random")


def test_mean_probe_weighs_devices_by_samples():
    a = LayerProbe([[1.0, 0.0], [0.0, 1.0]], {"loss": [1.0, 0.0], "cosine": [0.0, 0.0]})
    b = LayerProbe([[1.0, 1.0], [1.0, 1.0]], {"loss": [0.0, 1.0], "cosine": [1.0, 1.0]})
    m = mean_probe([(30, a), (10, b)])
    assert m.cka == [[1.0, 0.25], [0.25, 1.0]] and m.importance == {"loss": [0.75, 0.25], "cosine": [0.25, 0.25]}


def units_of(plan: Plan) -> int:
    return sum(1 if l in plan.blocks else 2 for l in plan.resident(2))


def test_fine_plans_keep_blocks_and_layers_are_averaged_where_their_attention_ran(tiny_bert, tmp_path):
    # The server probes (on a proxy set): round 0's plans are chosen on a probe, and ask devices for none.
    raw = tiny_config(tiny_bert, rounds=1, **{"strategy.name": "fedpruner_fine", "strategy.cka": "server",
                                              "data.proxy_file": write_proxy(tmp_path / "proxy.csv", 1)})
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


def test_devices_probe_their_own_data_and_the_server_never_does(tiny_bert, tmp_path):
    raw = tiny_config(tiny_bert, rounds=3, **{"strategy.name": "fedpruner_fine", "strategy.cka": "device",
                                              "strategy.regroup_every": 2, "strategy.probe_rows": 8})
    cfg = from_dict(raw)
    exp = setup(cfg)
    summary = run_inprocess(cfg, tmp_path, quiet=True)
    assert summary["failures"] == [] and summary["final_accuracy"] is not None
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    strategy = make_strategy(exp)
    assert strategy.ctx.probe is None  # no proxy set: the server has no rows to probe on
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
        # A pass with every unit, then one without each: by blocks, one more pass per layer; and the
        # CKA of every pair of units (4 by blocks, 2 by layers; hidden size 32, 8 rows of 16 tokens).
        prof, n = exp.cost.profile, exp.info.num_layers
        whole = (prof.embed_s + sum(prof.forward_frozen_s)) * 8 / (prof.batch_size * prof.seq_len / cfg.model.max_length)
        cka = ((4 * 3 // 2 + 4) - (2 * 1 // 2 + 2)) * 2 * 8 * 16 * 32 ** 2 / (REFERENCE_GFLOPS * 1e9)
        assert probe_s - by_layer == pytest.approx((n * whole + cka) / device.speed)
        assert d["bytes_up"] == pytest.approx(exp.cost.bytes_up(plan), abs=16)
        assert d["bytes_up"] - exp.cost.bytes_up(plain) >= 8 * (4 * 4 + 2 * 4)
    probe = torch.load(tmp_path / "checkpoint.pt")["strategy"]["probe"]
    assert probe["blocks"] and len(probe["cka"]) == 4 and len(probe["importance"]["loss"]) == 4
    assert rows[1]["bytes_up"] < rows[0]["bytes_up"]  # round 1 does not probe (regroup_every: 2)


def test_device_probing_is_the_default_and_a_server_probe_needs_a_proxy_set_named_before_the_model_loads(
        tiny_bert, tmp_path):
    assert FedPrunerOptions().cka == "device"
    check_inputs(from_dict(tiny_config(tiny_bert, **{"strategy.name": "fedpruner"})))
    raw = tiny_config("no/such-model", **{"strategy.name": "fedpruner_fine", "strategy.cka": "server"})
    with pytest.raises(TestbedError, match=r"strategy.cka: server .* data.proxy_file names none"):
        check_inputs(from_dict(raw))  # refused before the model (which does not exist) is even looked for
    raw["data"]["proxy_file"] = write_proxy(tmp_path / "proxy.csv", 1)
    with pytest.raises(TestbedError, match="model.name"):
        check_inputs(from_dict(raw))


def test_the_proxy_set_is_labelled_like_the_training_data_and_holds_none_of_its_rows(tmp_path):
    cfg = from_dict(tiny_config("unused", **{"data.proxy_file": write_proxy(tmp_path / "proxy.csv", 1)})).data
    splits = load_splits(cfg, 0)
    written = proxy_rows(1)
    assert splits.proxy == written
    answered = load_splits(dataclasses.replace(cfg, label_words=["a", "b", "c", "d"]), 0, "causal_lm").proxy
    assert answered.responses == ["abcd"[y] for y in written.labels]
    # a training row is refused, even where the run's sample of the training rows leaves it out
    sample = dataclasses.replace(cfg, max_train=10, proxy_file="")
    left_out = next(t for t in splits.train.texts if t not in load_splits(sample, 0).train.texts)
    (tmp_path / "leak.csv").write_text(f"text,label\n{left_out},0\nfresh words,0\n")
    for leak in (dataclasses.replace(cfg, proxy_file=str(tmp_path / "leak.csv")),
                 dataclasses.replace(sample, proxy_file=str(tmp_path / "leak.csv"))):
        with pytest.raises(TestbedError, match="data.proxy_file: 1 of its 2 rows are also rows of the training or"):
            load_splits(leak, 0)
    # string labels get the training data's ids; one the run does not have is refused
    for name, text in (("train", "good film,pos\nbad film,neg\n" * 4), ("test", "fine,pos\nawful,neg\n"),
                       ("proxy", "great,pos\ndull,neg\nsplendid,pos\n"), ("odd", "great,pos\nso-so,meh\n")):
        (tmp_path / f"{name}.csv").write_text("text,label\n" + text)
    files = DataConfig(source="files", train_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv"),
                       proxy_file=str(tmp_path / "proxy.csv"))
    splits = load_splits(files, 0)
    assert splits.label_names == ["neg", "pos"] and splits.proxy.labels == [1, 0, 1]
    with pytest.raises(TestbedError, match=r"data.label_column: data.proxy_file \(.*odd.csv\) has label 'meh'"):
        load_splits(dataclasses.replace(files, proxy_file=str(tmp_path / "odd.csv")), 0)


def server_probe_of(model: str, proxy: str, train_rows: int) -> tuple[torch.Tensor, LayerProbe]:
    """The training rows of a `cka: server` run on `proxy`, and the probe its first round is planned on."""
    raw = tiny_config(model, **{"strategy.name": "fedpruner", "strategy.cka": "server", "data.proxy_file": proxy,
                                "data.synthetic_train": train_rows})
    exp = setup(from_dict(raw))
    strategy = make_strategy(exp)
    plans = strategy.plan(0, list(exp.devices), initial_state(exp, strategy))
    assert all(not p.probe_rows for p in plans.values())  # the server probed: no device is asked to
    return exp.data.train.input_ids, strategy.probe


def test_the_server_probes_its_proxy_set_and_never_the_devices_rows(tiny_bert, tmp_path):
    """The server's probe follows the proxy file's rows and ignores the training rows: the same
    proxy over other training rows gives the same probe, another proxy another."""
    proxy, other = write_proxy(tmp_path / "proxy.csv", 1), write_proxy(tmp_path / "other.csv", 2)
    train, probe = server_probe_of(tiny_bert, proxy, 200)
    other_train, same = server_probe_of(tiny_bert, proxy, 240)
    assert other_train.shape[0] == 240 and not torch.equal(other_train[:200], train)  # other rows altogether
    assert same == probe
    _, elsewhere = server_probe_of(tiny_bert, other, 200)
    assert elsewhere.cka != probe.cka


def kept_units(plan: Plan) -> set[int]:
    """A fine plan's kept units as the probe numbers them: layer l's attention 2l, its FFN 2l + 1."""
    return {2 * l + i for l in plan.resident(2) for i, b in enumerate(("attn", "ffn")) if plan.block(l) in (b, BOTH)}


# The devices' probe of 4 units: 0 and 2 alike, all else apart; importance 0.25, 1, 0.75, 1.  Keeping 3:
# contiguous groups [0] [1 2] [3] keep 0, 1, 3; graph groups [0 2] [1] [3] keep 1, 2, 3 (or by sampling 0).
DEVICE_CKA = [[1.0, 0.1, 0.9, 0.1], [0.1, 1.0, 0.2, 0.1], [0.9, 0.2, 1.0, 0.15], [0.1, 0.1, 0.15, 1.0]]
DEVICE_PROBE = LayerProbe(DEVICE_CKA, {"loss": [0.25, 1.0, 0.75, 1.0], "cosine": [0.0] * 4}, blocks=True)


@pytest.mark.parametrize("grouping, selection", [("contiguous", "importance"), ("graph", "importance"),
                                                 ("graph", "sampled")])
def test_device_probes_drive_the_grouping_and_selection_from_the_next_round(tiny_bert, grouping, selection):
    """cka: device.  Round 0 has no probe yet: every device that can hold the probe is asked for one
    (the small device, pruned to 3 units, cannot) and the small device's units are drawn at random
    (as many as fit); from round 1 the mean of the probes that came back groups them (graph
    partitioning or contiguous segments) and selects one per group."""
    raw = tiny_config(tiny_bert, **{"strategy.name": "fedpruner_fine", "strategy.grouping": grouping,
                                    "strategy.selection": selection, "devices": {"laptop": 1, "jetson-tx2": 1}})
    exp = setup(from_dict(raw))
    strategy = make_strategy(exp)
    small, pruner = exp.devices["jetson-tx2-0"], strategy.pruner
    threes = [pruner.plan_of([u for u in pruner.units if u != drop]) for drop in pruner.units]
    small.memory_mb = max(exp.cost.peak_memory_bytes(small, p) for p in threes) / 2**20  # any 3 units fit, not 4
    state = initial_state(exp, strategy)
    plans = strategy.plan(0, list(exp.devices), state)
    assert strategy.probe is None and len(kept_units(plans["jetson-tx2-0"])) == 3
    large = plans["laptop-0"]
    assert large.probe_rows == strategy.opts.probe_rows and large.probe_blocks
    assert exp.cost.probe_memory_bytes(large) > small.memory_mb * 2**20 and plans["jetson-tx2-0"].probe_rows == 0
    updates, head = [], get_head(exp.bb)
    for d, plan in plans.items():
        u = Update(d, 0, state.downlink(plan, 2), head, samples=len(exp.data.shards[d].train),
                   active_steps=dict.fromkeys(plan.resident(2), 3), steps=3, loss=1.0,
                   probe=DEVICE_PROBE if plan.probe_rows else None)
        assert check_update(u, plan, exp.info, head, len(exp.data.shards[d].train)) is None
        updates.append(u)
    state = strategy.aggregate(0, updates, [], state)
    assert strategy.probe == DEVICE_PROBE
    kept = [kept_units(strategy.plan(r, list(exp.devices), state)["jetson-tx2-0"]) for r in range(1, 41)]
    if selection == "importance":
        assert kept == [{0, 1, 3} if grouping == "contiguous" else {1, 2, 3}] * 40
    else:  # 2 or 0 from their group, in proportion to importance (3 to 1); 1 and 3 alone in theirs
        assert all(k - {0, 2} == {1, 3} and len(k) == 3 for k in kept)
        assert 0 < sum(0 in k for k in kept) < sum(2 in k for k in kept)


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_the_probe_holds_what_the_cost_model_counts(tiny_bert, tiny_decoders, model):
    """The bytes a device-side probe holds (the whole model, every unit's output and its float copy,
    a causal LM's logits over its vocabulary), counted on the real tensors, are what the cost
    model predicts when every token is real (it counts padding too: an upper bound)."""
    lm = {"task": "causal_lm", "data.prompt": "{text} topic :", "data.label_words": ["a", "b", "c", "d"]}
    raw = tiny_config(tiny_bert, **{"strategy.name": "fedpruner"}) if model == "bert" else \
        tiny_config(tiny_decoders["llama"], **{"strategy.name": "fedpruner", **lm})
    exp = setup(from_dict(raw))
    state = initial_state(exp, make_strategy(exp))
    for blocks in (False, True):
        plan = Plan(ranks={0: 4, 1: 4}, batch_size=8, probe_rows=8, probe_blocks=blocks)
        batch = exp.data.train.take(list(range(8)))
        _, padded = probe_layers(exp.bb, state.lora, state.head, batch, exp.cfg.model.lora, blocks)
        batch["attention_mask"][:] = 1
        _, full = probe_layers(exp.bb, state.lora, state.head, batch, exp.cfg.model.lora, blocks)
        predicted = exp.cost.probe_memory_bytes(plan)
        assert padded <= full and abs(predicted / full - 1) < 0.02
        assert exp.cost.peak_memory_bytes(exp.devices["laptop-0"], plan) == max(
            predicted, exp.cost.training_memory_bytes(plan))
    assert exp.cost.probe_memory_bytes(dataclasses.replace(plan, probe_rows=0)) == 0


def test_a_device_that_cannot_hold_the_probe_trains_without_probing_and_one_made_to_probe_fails(tiny_bert, tmp_path):
    """A budget that holds the device's training but not the whole-model probe: FedPruner does not
    ask it to probe (it trains, within its budget, every round); an agent asked anyway fails the
    round as out of memory, as training over its budget does.  A device that probes reports the
    probe's footprint where it is the larger."""
    raw = tiny_config(tiny_bert, rounds=2, **{"strategy.name": "fedpruner", "strategy.probe_rows": 64,
                                              "devices": {"laptop": 1, "jetson-tx2": 1}})
    exp = setup(from_dict(raw))
    plan = Plan(ranks={0: 4, 1: 4}, local_steps=3, batch_size=8)
    probed = dataclasses.replace(plan, probe_rows=64)
    train, probe = exp.cost.training_memory_bytes(plan) / 2**20, exp.cost.probe_memory_bytes(probed) / 2**20
    assert probe > train  # on the tiny model, a probe of 64 rows holds more than training at batch 8
    raw["devices"] = {"laptop": 1, "jetson-tx2": {"count": 1, "memory_mb": (train + probe) / 2}}
    summary = run_inprocess(from_dict(raw), tmp_path / "run", quiet=True)
    assert summary["failures"] == []
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_device = {d["device"]: d for d in rows[0]["devices"]}
    assert by_device["jetson-tx2-0"]["peak_train_mem_mb"] < (train + probe) / 2  # trained whole, did not probe
    assert abs(by_device["laptop-0"]["peak_train_mem_mb"] / probe - 1) < 0.05  # probed: the probe's peak
    cfg = from_dict(raw)
    exp = setup(cfg)
    agent = Agent("jetson-tx2-0", cfg, exp.bb, exp.data.train, exp.data.shards["jetson-tx2-0"], (train + probe) / 2)
    state = initial_state(exp, make_strategy(exp))
    with pytest.raises(OutOfMemory, match="the probe needs"):
        agent.run(0, Job(probed, state.downlink(probed, 2), state.head))
