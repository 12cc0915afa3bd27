"""An agent process: serves its devices' plans from rank 0 until told to stop."""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from testbed.agent.agent import Agent
from testbed.comm.distributed import hosts, patience_s
from testbed.comm.framing import recv_bytes, send_bytes
from testbed.comm.join import Hello, echo_probes, send_hello
from testbed.comm.wire import (Message, WireError, pack, read_plan, unpack,
                               update_message)
from testbed.core.config import ExperimentConfig
from testbed.core.errors import OutOfMemory, TestbedError
from testbed.core.plan import Job
from testbed.experiments.setup import setup
from testbed.measure.memory import (MIB, MemoryMeasure, join_memory, peak_mb,
                                    reset_peak)
from testbed.measure.profiler import profile_device
from testbed.model.placement import describe
from testbed.model.residency import hold
from testbed.server.experiment import Experiment

log = logging.getLogger("testbed.agent")


def serve(cfg: ExperimentConfig, rank: int, agents: int, key: bytes) -> None:
    exp = setup(cfg, agent=True)  # layers are read when a plan runs them
    mine = [d for d, r in hosts(list(exp.devices), agents).items() if r == rank]
    local = {d: Agent(d, cfg, exp.bb, exp.data.train, exp.data.shards[d], exp.devices[d].memory_mb)
             for d in mine}
    log.info("rank %d serves %s", rank, ", ".join(mine) or "no device")
    join(cfg, exp, key)
    dtype = getattr(torch, cfg.wire.dtype)
    last_seq = 0
    while True:
        try:
            msg = unpack(recv_bytes(0, patience_s(cfg)), key)
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
        try:
            update = local[msg.device].run(msg.round, Job(*read_plan(msg)))
        except OutOfMemory as exc:
            failure = Message("failure", msg.round, msg.device, msg.seq, {"kind": "oom", "detail": str(exc)})
            send_bytes(pack(failure, key), 0)
            continue
        send_bytes(pack(update_message(update, msg.seq), key, dtype), 0)


def join(cfg: ExperimentConfig, exp: Experiment, key: bytes) -> None:
    """Hello with this device's profile and memory, then echo rank 0's link probes."""
    device = exp.bb.placement.device
    memory = join_memory(device)
    profile = None
    if cfg.dist.profile:
        start = time.perf_counter()
        hold(exp.bb, list(range(exp.info.num_layers)))  # the profile times every layer; released after
        batch = profile_batch(cfg, exp, memory)
        reset_peak(device)
        profile = profile_device(exp.bb, cfg.model.name, exp.info, cfg.model.lora, batch, cfg.model.max_length)
        memory = dataclasses.replace(memory, peak_mb=peak_mb(device), counted_mb=profile.step_footprint_bytes() / MIB,
                                     other_mb=profile.other_bytes / MIB)
        hold(exp.bb, [])
        log.info("profiled this device in %.1f s (batch %d); memory limit %.0f MiB, %.0f MiB in use before",
                 time.perf_counter() - start, batch, memory.limit_mb, memory.base_mb)
    send_hello(Hello(profile, memory, f"{describe(device)}, {exp.bb.placement.precision}"), key)
    echo_probes(patience_s(cfg))


def profile_batch(cfg: ExperimentConfig, exp: Experiment, memory: MemoryMeasure) -> int:
    """The training batch, halved while its profiled step would not fit this device's memory (a
    host whose cgroup is tight would be killed profiling the full batch): estimated from one
    step at batch 2, whose peak memory and counted footprint give the growth of memory with the count."""
    batch = cfg.train.batch_size
    if batch <= 2:
        return batch
    device = exp.bb.placement.device
    reset_peak(device)
    probe = profile_device(exp.bb, cfg.model.name, exp.info, cfg.model.lora, 2, cfg.model.max_length, repeats=1,
                           fit=False)  # its memory, not its seconds
    small = dataclasses.replace(memory, peak_mb=peak_mb(device), counted_mb=probe.step_footprint_bytes() / MIB,
                                other_mb=probe.other_bytes / MIB)
    budget = small.budget_mb()
    while budget is not None and batch > 2 and probe.step_footprint_bytes(batch) / MIB > budget:
        batch //= 2
    return batch
