"""A corpus of bad replies to a plan, fed through rank 0's real receiving code over gloo.

Two processes join a torch.distributed group.  For every case, rank 0 runs one round of a
`DistTransport` (send the plan, receive the reply, check it) and hands what it accepted to
update admission (`testbed.server.admission.admit`), exactly as the aggregator does; rank 1
answers the plan with the case's reply.  Rank 0 prints one JSON line per case:
`{"case", "stage", "rejected", "reason"}`, where `stage` says which check should refuse it
(`wire`: the transport; `admission`: the update checks).  The first case, `control`, is an
honest update: it must be admitted, or the harness would prove nothing.

    python -m launch.faults.malformed       # each rank, as run_corpus() starts them
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from launch.net import free_port

ROOT = Path(__file__).resolve().parents[2]  # where `launch` and `testbed` are
KEY = b"corpus-key-" + b"k" * 21
ROUND = 3
SAMPLES = 10
# a two-layer model with one LoRA module per layer: q (8 x 8), and a 2-class head
SHAPES = {"q": (8, 8)}
PLAN_RANK = 4
LOCAL_STEPS = 3

# (case, stage): replies to a plan that rank 0 must refuse, after the control it must admit
CASES = [("control", "none"),
         ("flipped digest byte", "wire"), ("flipped payload byte", "wire"), ("wrong key", "wire"),
         ("missing digest", "wire"), ("truncated", "wire"), ("oversize length prefix", "wire"),
         ("oversize payload length", "wire"), ("trailing bytes", "wire"), ("bad magic", "wire"),
         ("malformed header", "wire"), ("wrong round", "wire"), ("replay", "wire"), ("unknown device", "wire"),
         ("wrong kind", "wire"), ("integer dtype", "wire"), ("float64 dtype", "wire"), ("missing report", "wire"),
         ("NaN", "admission"), ("Inf in head", "admission"), ("wrong shape", "admission"),
         ("layer not in the plan", "admission"), ("rank above the plan", "admission"),
         ("head of another shape", "admission"), ("missing tensor", "admission"),
         ("inflated samples", "admission"), ("wrong step counts", "admission")]


def plan_and_info():
    from testbed.core.plan import Plan
    from testbed.model.info import ModelInfo

    info = ModelInfo(num_layers=2, modules={0: ["q"], 1: ["q"]}, shapes=dict(SHAPES), scaling=2.0,
                     layer_params=64, other_params=16)
    return Plan(ranks={0: PLAN_RANK, 1: PLAN_RANK}, local_steps=LOCAL_STEPS), info


def head() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(2, 8), "b": torch.zeros(2)}


def honest_update(device: str, round: int):
    from testbed.core.plan import Update

    g = torch.Generator().manual_seed(round)
    lora = {l: {"q.A": torch.randn(PLAN_RANK, 8, generator=g), "q.B": torch.randn(8, PLAN_RANK, generator=g)}
            for l in (0, 1)}
    return Update(device, round, lora, {n: t + 0.5 for n, t in head().items()}, samples=SAMPLES,
                  active_steps={0: LOCAL_STEPS, 1: LOCAL_STEPS}, steps=LOCAL_STEPS, loss=0.5)


def reply(case: str, plan_msg, previous: bytes | None) -> bytes | int:
    """The bytes rank 1 sends for `case` (an int: a bare length prefix, with no message after it)."""
    from testbed.comm.wire import PREFIX, Message, pack, update_message

    seq, rnd, device = plan_msg.seq, plan_msg.round, plan_msg.device
    u = honest_update(device, rnd)

    def packed(update=u, s=seq, key=KEY, dtype=None, edit=None) -> bytes:
        msg = update_message(update, s)
        if edit:
            edit(msg)
        return bytes(pack(msg, key, dtype))

    good = packed()
    flip = lambda b, i: b[:i] + bytes([b[i] ^ 0x40]) + b[i + 1:]  # noqa: E731
    if case == "control":
        return good
    if case == "flipped digest byte":
        return flip(good, 20)
    if case == "flipped payload byte":
        return flip(good, len(good) - 5)
    if case == "wrong key":
        return packed(key=b"another key")
    if case == "missing digest":
        return good[:16] + b"\0" * 32 + good[48:]
    if case == "truncated":
        return good[: len(good) // 2]
    if case == "oversize length prefix":
        return 1 << 40
    if case == "oversize payload length":
        magic, hlen, _, digest = PREFIX.unpack_from(good)
        return PREFIX.pack(magic, hlen, 1 << 40, digest) + good[PREFIX.size:]
    if case == "trailing bytes":
        return good + b"\0" * 8
    if case == "bad magic":
        return b"XXXX" + good[4:]
    if case == "malformed header":
        import hashlib
        import hmac

        header = b'{"kind": "update"}'
        return PREFIX.pack(b"TBW1", len(header), 0, hmac.new(KEY, header, hashlib.sha256).digest()) + header
    if case == "wrong round":
        return packed(update=honest_update(device, rnd + 1))
    if case == "replay":
        return previous  # the control's reply, byte for byte: right device and round, an old sequence number
    if case == "unknown device":
        return packed(update=honest_update("d-unknown", rnd))
    if case == "wrong kind":
        return bytes(pack(Message("hello", rnd, device, seq, {"profile": None}), KEY))
    if case == "integer dtype":
        return packed(edit=lambda m: m.tensors.update({"lora.0.q.A": m.tensors["lora.0.q.A"].long()}))
    if case == "float64 dtype":
        return packed(edit=lambda m: m.tensors.update({"lora.0.q.A": m.tensors["lora.0.q.A"].double()}))
    if case == "missing report":
        return packed(edit=lambda m: m.tensors.pop("report"))
    if case == "NaN":
        u.lora[1]["q.B"][3, 1] = float("nan")
    elif case == "Inf in head":
        u.head["w"][0, 0] = float("inf")
    elif case == "wrong shape":
        u.lora[0]["q.A"] = torch.zeros(PLAN_RANK, 9)
    elif case == "layer not in the plan":
        u.lora[5] = dict(u.lora[0])
    elif case == "rank above the plan":
        u.lora[1] = {"q.A": torch.zeros(8, 8), "q.B": torch.zeros(8, 8)}
    elif case == "head of another shape":
        u.head["w"] = torch.zeros(3, 8)
    elif case == "missing tensor":
        del u.lora[0]["q.B"]
    elif case == "inflated samples":
        u.samples = 10 * SAMPLES
    elif case == "wrong step counts":
        u.active_steps[0] = LOCAL_STEPS + 4
    else:
        raise ValueError(case)
    return packed(update=u)


def receiver() -> None:
    """Rank 0: one DistTransport round per case, then admission; one JSON line per case."""
    from testbed.comm.distributed import DistTransport
    from testbed.core.plan import Job
    from testbed.server.admission import admit

    plan, info = plan_and_info()
    for i, (case, stage) in enumerate(CASES):
        transport = DistTransport(["d0"], 1, KEY, torch.float32, deadline_s=30)
        transport.ranks[1].seq = 10 * i  # one growing stream, as in a run
        result = transport.run_round(ROUND, {"d0": Job(plan, {}, head())})
        admitted = admit(ROUND, {"d0": plan}, result, info, head(), {"d0": SAMPLES})
        reason = result.failures[0].detail if result.failures else ""
        print(json.dumps({"case": case, "stage": stage, "rejected": not admitted, "reason": reason}), flush=True)


def rogue() -> None:
    """Rank 1: answers each plan with its case's reply."""
    from testbed.comm.framing import recv_bytes, send_bytes
    from testbed.comm.wire import unpack

    previous = None
    for case, _ in CASES:
        plan_msg = unpack(recv_bytes(0), KEY)
        data = reply(case, plan_msg, previous)
        if isinstance(data, int):
            torch.distributed.send(torch.tensor([data], dtype=torch.int64), 0)
        else:
            send_bytes(memoryview(bytearray(data)), 0)
        previous = previous or data


def run_corpus(timeout: float = 180) -> tuple[list[dict], str]:
    """Run both ranks; return rank 0's case lines and its log."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port("127.0.0.1")), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "launch.faults.malformed"], env={**env, "RANK": str(r)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    if procs[0].returncode:
        raise RuntimeError(f"the corpus receiver failed: {outs[0][1][-2000:]}")
    lines = [json.loads(l) for l in outs[0][0].splitlines() if l.startswith("{")]
    return lines, outs[0][1]


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
    receiver() if dist.get_rank() == 0 else rogue()
    sys.stdout.flush()
    os._exit(0)  # skip gloo teardown
