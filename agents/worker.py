"""An agent process: serves its devices' plans from rank 0 until told to stop."""
from __future__ import annotations

import logging

import torch

from agents.agent import Agent
from testbed.config import ExperimentConfig
from testbed.errors import TestbedError
from testbed.dist import hosts, recv_bytes, send_bytes
from testbed.experiment import setup
from agents.trainer import OutOfMemory
from testbed.wire import Message, WireError, pack, read_plan, unpack, update_message

log = logging.getLogger("testbed.agent")


def serve(cfg: ExperimentConfig, rank: int, agents: int, key: bytes) -> None:
    exp = setup(cfg)
    mine = [d for d, r in hosts(list(exp.devices), agents).items() if r == rank]
    local = {d: Agent(d, cfg, exp.bb, exp.data.train, exp.data.shards[d], exp.devices[d].memory_mb)
             for d in mine}
    log.info("rank %d serves %s", rank, ", ".join(mine) or "no device")
    dtype = getattr(torch, cfg.wire.dtype)
    last_seq = 0
    while True:
        try:
            msg = unpack(recv_bytes(0), key)
        except RuntimeError as exc:  # gloo: the aggregator's connection closed
            raise TestbedError(f"rank {rank}: lost the aggregator (rank 0): {str(exc).splitlines()[0]}") from None
        except WireError as exc:
            log.error("rank %d: dropped a message from the aggregator: %s", rank, exc)
            continue
        if msg.kind == "bye":
            return
        if msg.seq <= last_seq or msg.device not in local:
            log.error("rank %d: dropped %s message %d for %r (replayed or not served here)",
                      rank, msg.kind, msg.seq, msg.device)
            continue
        last_seq = msg.seq
        plan, lora, head = read_plan(msg)
        try:
            update = local[msg.device].run(msg.round, plan, lora, head)
        except OutOfMemory as exc:
            failure = Message("failure", msg.round, msg.device, msg.seq, {"kind": "oom", "detail": str(exc)})
            send_bytes(pack(failure, key), 0)
            continue
        send_bytes(pack(update_message(update, msg.seq), key, dtype), 0)
