"""Wire: the byte format of one message.

    prefix   magic "TBW1" | header length (u32) | payload length (u64) | HMAC-SHA256 digest (32 bytes)
    header   compact JSON: kind, round, device, seq, meta, and the tensor index
             [[name, dtype, shape, offset, nbytes], ...]
    payload  the raw tensor bytes, each tensor at an 8-byte-aligned offset

The digest covers header and payload and is keyed with the run's secret.  `unpack` checks
every length, the digest and the index before it builds a tensor, and raises WireError
with a one-line reason for anything else.  Tensors it returns alias the buffer.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from dataclasses import dataclass, field

import torch

from testbed.core.errors import TestbedError
from testbed.core.plan import (BOTH, HeadState, LayerProbe, LoraState, Plan,
                               Report, Update)

MAGIC = b"TBW1"
PREFIX = struct.Struct("<4sIQ32s")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}
NAMES = {v: k for k, v in DTYPES.items()}


class WireError(TestbedError):
    """A message that cannot be trusted or decoded."""


@dataclass
class Message:
    kind: str
    round: int
    device: str
    seq: int  # per-sender counter: the receiver refuses replays
    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def pack(msg: Message, key: bytes, dtype: torch.dtype | None = None) -> memoryview:
    tensors = [_for_wire(t, dtype) for t in msg.tensors.values()]
    index, header, size = _layout(msg, tensors)
    start = PREFIX.size + len(header)
    # Uninitialised, unlike bytearray(n): zeroing first would touch every page twice.
    out = torch.empty(start + size, dtype=torch.uint8)
    buf = memoryview(out.numpy()).cast("B")
    buf[PREFIX.size:start] = header
    pieces, end = [], 0
    for (_, _, _, offset, nbytes), t in zip(index, tensors):
        if offset > end:  # alignment padding: zeros, so that the digest covers no stale bytes
            pieces.append(torch.zeros(offset - end, dtype=torch.uint8))
        pieces.append(t.reshape(-1).view(torch.uint8))
        end = offset + nbytes
    if pieces:
        torch.cat(pieces, out=out[start:])  # one copy for all tensors: per-tensor calls dominate small messages
    mac = hmac.new(key, header, hashlib.sha256)
    mac.update(buf[start:])
    PREFIX.pack_into(buf, 0, MAGIC, len(header), size, mac.digest())
    return buf


def packed_size(msg: Message, dtype: torch.dtype | None = None) -> int:
    """The size `pack` would produce; the tensors may live on the meta device (no data needed)."""
    tensors = [t.to(dtype) if dtype is not None and t.dtype == torch.float32 else t for t in msg.tensors.values()]
    _, header, size = _layout(msg, tensors)
    return PREFIX.size + len(header) + size


def _layout(msg: Message, tensors: list[torch.Tensor]) -> tuple[list, bytes, int]:
    index, size = [], 0
    for name, t in zip(msg.tensors, tensors):
        if t.dtype not in NAMES:
            raise TestbedError(f"wire: cannot send a tensor of dtype {t.dtype}")
        size = (size + 7) & ~7
        nbytes = t.numel() * t.element_size()
        index.append([name, NAMES[t.dtype], list(t.shape), size, nbytes])
        size += nbytes
    header = json.dumps({"kind": msg.kind, "round": msg.round, "device": msg.device, "seq": msg.seq,
                         "meta": msg.meta, "index": index}, separators=(",", ":")).encode()
    return index, header, size


def _for_wire(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Model tensors (float32) travel in `dtype` when given; float64 ones (measurements) stay exact."""
    t = t.detach().cpu()
    if dtype is not None and t.dtype == torch.float32:
        t = t.to(dtype)
    return t.contiguous()


def unpack(buf: bytes | bytearray | memoryview, key: bytes) -> Message:
    view = memoryview(buf).cast("B")
    if view.readonly:  # tensors alias the buffer, so they need one they may own
        view = memoryview(bytearray(view))
    if len(view) < PREFIX.size:
        raise WireError(f"truncated: {len(view)} bytes, shorter than the {PREFIX.size}-byte prefix")
    magic, hlen, plen, digest = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}: not a testbed message")
    start = PREFIX.size + hlen
    if len(view) != start + plen:
        what = "truncated" if len(view) < start + plen else "trailing bytes"
        raise WireError(f"{what}: {len(view)} bytes, the prefix announces {start + plen}")
    header, payload = view[PREFIX.size:start], view[start:]
    mac = hmac.new(key, header, hashlib.sha256)
    mac.update(payload)
    if not hmac.compare_digest(mac.digest(), digest):
        raise WireError("digest mismatch: wrong key, or the message was altered")
    try:
        head = json.loads(bytes(header))
        msg = Message(str(head["kind"]), int(head["round"]), str(head["device"]), int(head["seq"]),
                      dict(head["meta"]))
        index = list(head["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"malformed header: {exc}") from None
    for entry in index:
        name, tensor = _tensor(entry, payload)
        if name in msg.tensors:
            raise WireError(f"tensor {name!r} appears twice")
        msg.tensors[name] = tensor
    return msg


def _tensor(entry: object, payload: memoryview) -> tuple[str, torch.Tensor]:
    try:
        name, dtype_name, shape, offset, nbytes = entry
        shape = [int(s) for s in shape]
        offset, nbytes = int(offset), int(nbytes)
    except (ValueError, TypeError):
        raise WireError(f"malformed index entry {str(entry)[:80]}") from None
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise WireError(f"tensor {name!r}: unsupported dtype {dtype_name!r}")
    if any(s < 0 for s in shape):
        raise WireError(f"tensor {name!r}: negative dimension in {shape}")
    numel = math.prod(shape)
    if nbytes != numel * dtype.itemsize:
        raise WireError(f"tensor {name!r}: {nbytes} bytes do not match shape {shape} of {dtype_name}")
    if offset < 0 or offset + nbytes > len(payload):
        raise WireError(f"tensor {name!r}: bytes {offset}..{offset + nbytes} lie outside the payload")
    if numel == 0:
        return name, torch.empty(shape, dtype=dtype)
    return name, torch.frombuffer(payload, dtype=dtype, count=numel, offset=offset).view(shape)


# Plans and updates on the wire.  JSON has no integer keys: per-layer maps travel as pairs.

def plan_message(round: int, device: str, seq: int, plan: Plan, lora: LoraState, head: HeadState) -> Message:
    meta = {"ranks": sorted(plan.ranks.items()), "layers": plan.layers, "drop": sorted(plan.drop.items()),
            "personal": plan.personal, "frozen": plan.frozen, "local_steps": plan.local_steps,
            "batch_size": plan.batch_size, "lr": plan.lr, "validate": plan.validate,
            "blocks": sorted(plan.blocks.items()), "probe_rows": plan.probe_rows, "probe_blocks": plan.probe_blocks}
    if plan.max_active:  # absent when uncapped, so uncapped plans keep their size on the wire
        meta["max_active"] = plan.max_active
    return Message("plan", round, device, seq, meta, _flatten(lora, head))


def read_plan(msg: Message) -> tuple[Plan, LoraState, HeadState]:
    m = msg.meta
    try:
        plan = Plan(ranks={int(l): int(r) for l, r in m["ranks"]},
                    layers=None if m["layers"] is None else [int(l) for l in m["layers"]],
                    drop={int(l): float(p) for l, p in m["drop"]}, personal=[int(l) for l in m["personal"]],
                    frozen=[int(l) for l in m["frozen"]],
                    local_steps=int(m["local_steps"]), batch_size=int(m["batch_size"]), lr=float(m["lr"]),
                    validate=bool(m["validate"]), blocks={int(l): str(b) for l, b in m["blocks"]},
                    probe_rows=int(m["probe_rows"]), probe_blocks=bool(m["probe_blocks"]),
                    max_active=int(m.get("max_active", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed plan from the aggregator: {exc}") from None
    if plan.max_active < 0:
        raise WireError(f"malformed plan from the aggregator: max_active {plan.max_active} < 0")
    if bad := sorted(set(plan.blocks.values()) - {"attn", "ffn", BOTH}):
        raise WireError(f"malformed plan from the aggregator: unknown block {bad[0]!r}")
    return (plan, *_unflatten(msg.tensors))


# Measured figures travel as one fixed-size float64 tensor, so that message sizes do not
# depend on them (the modelled clock's runs must count identical bytes).
MEASURED = ("compute_s", "step_s", "peak_train_mem_mb", "peak_rss_mb", "peak_cuda_mb",
            "val_accuracy_before", "val_accuracy", "val_loss_before", "val_loss")
# Figures only some hosts measure (power sensors, CUDA): each a float64 tensor of its own,
# `report.NAME`, sent only where measured, so that the messages of other hosts keep their size.
OPTIONAL = ("measured_energy_j", "peak_cuda_reserved_mb")


def update_message(update: Update, seq: int) -> Message:
    meta = {"samples": update.samples, "active_steps": sorted(update.active_steps.items()), "steps": update.steps,
            "loss": update.loss}
    tensors = _flatten(update.lora, update.head)
    tensors["report"] = torch.tensor([getattr(update.report, k) for k in MEASURED], dtype=torch.float64)
    for name in OPTIONAL:
        if (value := getattr(update.report, name)) is not None:
            tensors[f"report.{name}"] = torch.tensor([value], dtype=torch.float64)
    if update.probe is not None:  # float64 like every measurement; its size depends on the plan alone
        meta["probe_blocks"] = update.probe.blocks
        tensors["probe.cka"] = torch.tensor(update.probe.cka, dtype=torch.float64)
        for kind, values in update.probe.importance.items():
            tensors[f"probe.{kind}"] = torch.tensor(values, dtype=torch.float64)
    return Message("update", update.round, update.device, seq, meta, tensors)


def _read_probe(tensors: dict[str, torch.Tensor], blocks: object, device: str) -> LayerProbe | None:
    found = {name.removeprefix("probe."): tensors.pop(name) for name in list(tensors) if name.startswith("probe.")}
    if not found:
        return None
    cka = found.pop("cka", None)
    if cka is None or cka.dim() != 2 or cka.shape[0] != cka.shape[1] or \
            any(t.shape != (cka.shape[0],) for t in found.values()):
        raise WireError(f"update from {device!r}: a probe without a square CKA matrix and one value per unit")
    return LayerProbe(cka.tolist(), {k: t.tolist() for k, t in found.items()}, bool(blocks))


def read_update(msg: Message, dtype: torch.dtype | None = None) -> Update:
    """The update a message carries; `dtype`: the run's wire dtype, which its LoRA and head must have."""
    m = msg.meta
    tensors = dict(msg.tensors)
    measured = tensors.pop("report", None)
    if measured is None or measured.shape != (len(MEASURED),):
        raise WireError(f"update from {msg.device!r} lacks its report")
    optional = {name: tensors.pop(f"report.{name}", None) for name in OPTIONAL}
    if any(t is not None and t.shape != (1,) for t in optional.values()):
        raise WireError(f"update from {msg.device!r}: a measured figure that is not one number")
    probe = _read_probe(tensors, m.get("probe_blocks"), msg.device)
    lora, head = _unflatten(tensors, dtype)
    report = Report(**dict(zip(MEASURED, measured.tolist())),
                    **{k: t.item() for k, t in optional.items() if t is not None})
    try:
        return Update(device=msg.device, round=msg.round, lora=lora, head=head, samples=int(m["samples"]),
                      active_steps={int(l): int(n) for l, n in m["active_steps"]}, steps=int(m["steps"]),
                      loss=float(m["loss"]), report=report, probe=probe)
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed update from {msg.device!r}: {exc}") from None


def _flatten(lora: LoraState, head: HeadState) -> dict[str, torch.Tensor]:
    out = {f"lora.{l}.{n}": t for l, ts in sorted(lora.items()) for n, t in ts.items()}
    out.update({f"head.{n}": t for n, t in head.items()})
    return out


def _unflatten(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> tuple[LoraState, HeadState]:
    """Back to per-layer float32 state (the wire may have carried half precision)."""
    lora: LoraState = {}
    head: HeadState = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise WireError(f"tensor {name!r} is {NAMES[t.dtype]}, not floating point")
        if dtype is not None and t.dtype != dtype:
            raise WireError(f"tensor {name!r} is {NAMES[t.dtype]}, not the run's wire dtype {NAMES[dtype]}")
        kind, _, rest = name.partition(".")
        if kind == "head":
            head[rest] = t.float()
        elif kind == "lora" and rest.partition(".")[0].isdigit():
            layer, _, tname = rest.partition(".")
            lora.setdefault(int(layer), {})[tname] = t.float()
        else:
            raise WireError(f"unexpected tensor name {name!r}")
    return lora, head
