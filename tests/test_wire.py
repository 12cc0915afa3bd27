"""The wire format: exact round trips, and every kind of bad message refused with a reason."""
import hashlib
import hmac
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.comm.wire import (PREFIX, Message, WireError, pack, packed_size,
                               plan_message, read_plan, read_update, unpack,
                               update_message)
from testbed.core.plan import LayerProbe, Plan, Report, Update

KEY = b"k" * 32


def minilm_update() -> Update:
    g = torch.Generator().manual_seed(0)
    lora = {l: {f"attention.self.{m}.{ab}": torch.randn(*((8, 384) if ab == "A" else (384, 8)), generator=g)
                for m in ("query", "value") for ab in "AB"} for l in range(6)}
    head = {"classifier.weight": torch.randn(4, 384, generator=g), "classifier.bias": torch.randn(4, generator=g)}
    return Update("jetson-tx2-0", 3, lora, head, samples=750, active_steps={l: 10 for l in range(6)}, steps=10,
                  loss=0.8125, report=Report(compute_s=4.5, step_s=0.45, peak_train_mem_mb=240.0, peak_rss_mb=900.0,
                                             val_accuracy=0.75))


def test_update_round_trips_exactly():
    u = minilm_update()
    back = read_update(unpack(pack(update_message(u, 7), KEY), KEY))
    assert (back.device, back.round, back.samples, back.steps, back.loss) == (u.device, u.round, 750, 10, 0.8125)
    assert back.active_steps == u.active_steps and back.report == u.report
    for l in u.lora:
        for n, t in u.lora[l].items():
            assert torch.equal(back.lora[l][n], t)
    assert all(torch.equal(back.head[n], t) for n, t in u.head.items())


def test_measured_energy_travels_only_where_measured():
    u = minilm_update()
    plain = len(pack(update_message(u, 7), KEY))
    u.report.measured_energy_j = 123.456789
    buf = pack(update_message(u, 7), KEY)
    assert read_update(unpack(buf, KEY)).report == u.report
    assert len(buf) > plain  # hosts without power sensors keep the size the cost model counts


def test_plan_round_trips_exactly():
    plan = Plan(ranks={0: 0, 3: 4, 5: 8}, layers=[3, 5], drop={3: 0.25}, personal=[5], local_steps=7, batch_size=8,
                lr=1e-3, validate=True)
    lora = {3: {"q.A": torch.ones(4, 6), "q.B": torch.zeros(6, 4)}}
    back, lora_back, head = read_plan(unpack(pack(plan_message(2, "d", 1, plan, lora, {"w": torch.ones(3)}), KEY), KEY))
    assert back == plan and torch.equal(lora_back[3]["q.A"], lora[3]["q.A"]) and torch.equal(head["w"], torch.ones(3))
    capped = Plan(ranks={0: 4, 1: 4}, drop={0: 0.5}, max_active=1)
    assert read_plan(unpack(pack(plan_message(2, "d", 1, capped, {}, {}), KEY), KEY))[0] == capped
    assert "max_active" not in plan_message(2, "d", 1, plan, lora, {}).meta  # uncapped plans keep their size
    with pytest.raises(WireError, match="max_active -1"):
        read_plan(unpack(pack(plan_message(2, "d", 1, Plan(ranks={}, max_active=-1), {}, {}), KEY), KEY))


def test_block_plans_and_probes_round_trip_exactly():
    plan = Plan(ranks={1: 4}, layers=[0, 1], blocks={0: "ffn", 1: "attn"}, probe_rows=16, probe_blocks=True)
    back, _, _ = read_plan(unpack(pack(plan_message(0, "d", 1, plan, {}, {}), KEY), KEY))
    assert back == plan and Plan(ranks={}).block(3) == "both"
    u = minilm_update()
    u.probe = LayerProbe([[1.0, 0.25], [0.25, 1.0]], {"loss": [0.5, 0.125], "cosine": [0.1, 0.3]}, blocks=True)
    assert read_update(unpack(pack(update_message(u, 1), KEY, torch.float16), KEY)).probe == u.probe  # exact
    u.probe = LayerProbe([[1.0, 0.25]], {"loss": [0.5]}, blocks=True)
    with pytest.raises(WireError, match="square CKA"):
        read_update(unpack(pack(update_message(u, 1), KEY), KEY))
    bad = plan_message(0, "d", 1, Plan(ranks={}, blocks={0: "mlp"}), {}, {})
    with pytest.raises(WireError, match="unknown block 'mlp'"):
        read_plan(unpack(pack(bad, KEY), KEY))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_transfer(dtype):
    u = minilm_update()
    buf = pack(update_message(u, 1), KEY, dtype)
    assert len(buf) < 0.55 * len(pack(update_message(u, 1), KEY))
    back = read_update(unpack(buf, KEY))
    t = u.lora[0]["attention.self.query.A"]
    assert back.lora[0]["attention.self.query.A"].dtype == torch.float32
    assert torch.equal(back.lora[0]["attention.self.query.A"], t.to(dtype).float())
    assert back.report == u.report  # measurements stay exact (float64)


def test_messages_without_tensors_and_with_padding_round_trip():
    """A control message has no payload; odd-sized tensors need alignment padding, which is zeroed."""
    bye = unpack(pack(Message("bye", -1, "", 0, {}, {}), KEY), KEY)
    assert (bye.kind, bye.tensors) == ("bye", {})
    tensors = {"a": torch.arange(3, dtype=torch.float16), "b": torch.arange(5.0), "c": torch.empty(0)}
    buf = pack(Message("update", 1, "d", 1, {}, tensors), KEY)
    back = unpack(buf, KEY)
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items())
    payload = bytes(buf[-32:])  # a: 6 bytes at 0, b: 20 bytes at 8, c: none at 32
    assert payload[6:8] == b"\0" * 2 and payload[28:] == b"\0" * 4


def test_packed_size_matches_pack():
    u = minilm_update()
    msg = update_message(u, 1)
    assert packed_size(msg) == len(pack(msg, KEY))
    assert packed_size(msg, torch.float16) == len(pack(msg, KEY, torch.float16))


def test_header_overhead_is_small():
    u = minilm_update()
    buf = pack(update_message(u, 1), KEY)
    payload = sum(t.numel() * 4 for ts in u.lora.values() for t in ts.values()) + (4 * 384 + 4) * 4
    assert len(buf) / payload - 1 < 0.02


def forge(header: dict, payload: bytes, key: bytes = KEY) -> bytes:
    """A message with a valid digest around a header of our choosing."""
    h = json.dumps(header).encode()
    digest = hmac.new(key, h + payload, hashlib.sha256).digest()
    return PREFIX.pack(b"TBW1", len(h), len(payload), digest) + h + payload


def base_header(index):
    return {"kind": "update", "round": 0, "device": "d", "seq": 1, "meta": {}, "index": index}


@pytest.mark.parametrize("make, reason", [
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "digest mismatch"),
    (lambda b: b[: PREFIX.size + 3] + b"X" + b[PREFIX.size + 4:], "digest mismatch"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b[: PREFIX.size + 5], "truncated"),
    (lambda b: b[:-100], "truncated"),
    (lambda b: b + b"\0", "trailing bytes"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b"", "truncated"),
    (lambda b: forge(base_header([["t", "float32", [4], 0, 16]]), b"\0" * 8), "outside the payload"),
    (lambda b: forge(base_header([["t", "complex64", [1], 0, 8]]), b"\0" * 8), "unsupported dtype"),
    (lambda b: forge(base_header([["t", "float32", [2], 0, 8], ["t", "float32", [2], 0, 8]]), b"\0" * 8), "twice"),
    (lambda b: forge(base_header([["t", "float32", [3], 0, 8]]), b"\0" * 12), "do not match shape"),
    (lambda b: forge(base_header([["t", "float32", [-2], 0, 8]]), b"\0" * 8), "negative dimension"),
    (lambda b: forge(base_header([["t"]]), b""), "malformed index"),
    (lambda b: forge({"kind": "x"}, b""), "malformed header"),
])
def test_bad_messages_are_refused_with_a_reason(make, reason):
    good = bytes(pack(update_message(minilm_update(), 1), KEY))
    with pytest.raises(WireError, match=reason):
        unpack(make(good), KEY)


def test_wrong_key_and_missing_report():
    buf = pack(update_message(minilm_update(), 1), KEY)
    with pytest.raises(WireError, match="digest mismatch"):
        unpack(buf, b"other key")
    msg = update_message(minilm_update(), 1)
    del msg.tensors["report"]
    with pytest.raises(WireError, match="lacks its report"):
        read_update(unpack(pack(msg, KEY), KEY))


GOOD = bytes(pack(Message("update", 1, "d", 2, {"a": 1}, {"x": torch.arange(6.0)}), KEY))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)).map(
                     lambda p: GOOD[: p[0]] + bytes([GOOD[p[0]] ^ p[1]]) + GOOD[p[0] + 1:]),
                 st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n])))
def test_fuzzed_bytes_only_ever_raise_wire_errors(data):
    with pytest.raises(WireError):
        unpack(data, KEY)
