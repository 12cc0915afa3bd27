"""Joining a distributed run, both sides of it.

An agent rank sends a hello (the profile it measured of its device, its memory, and where its
model runs), then
echoes the probe buffers rank 0 sends it; rank 0 reads the hello and times the echoes, whose
round trips give the link's latency (the small probes) and bandwidth (the large ones).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

from testbed.comm.framing import recv_bytes, send_bytes
from testbed.comm.wire import Message, WireError, pack, unpack
from testbed.measure.memory import MemoryMeasure
from testbed.measure.profiler import DeviceProfile, profile_from_dict
from testbed.model.info import ModelInfo

SMALL, LARGE = 5, 3  # how many probes of each size
PROBES = (1,) * SMALL + (1 << 20,) * LARGE  # bytes


@dataclass
class Hello:
    """What an agent rank says when it joins."""

    profile: DeviceProfile | None  # None when the agent was told not to profile
    memory: MemoryMeasure | None  # None from an agent that did not say
    device: str = ""  # where its model runs, e.g. "cuda:0 (Orin, compute capability 8.7)", and in what precision


@dataclass
class Joined:
    """What rank 0 learnt about an agent rank when it joined."""

    rank: int
    devices: list[str]
    profile: DeviceProfile | None  # None when the agent was told not to profile
    bandwidth_mbit: float
    latency_ms: float
    memory: MemoryMeasure | None = None  # None from an agent that did not say
    device: str = ""  # its Hello's


# The agent's side.

def send_hello(hello: Hello, key: bytes) -> None:
    meta = {"profile": None if hello.profile is None else dataclasses.asdict(hello.profile),
            "memory": None if hello.memory is None else dataclasses.asdict(hello.memory), "device": hello.device}
    send_bytes(pack(Message("hello", -1, "", 0, meta), key), 0)


def echo_probes(wait_s: float) -> None:
    """Send each of rank 0's probes straight back.  Rank 0 times the agents one after the other,
    so the first probe may be long in coming: `wait_s`."""
    for _ in PROBES:
        send_bytes(recv_bytes(0, wait_s), 0)


# Rank 0's side.

def receive_hello(rank: int, key: bytes, info: ModelInfo, wait_s: float = 0.0) -> Hello:
    """`rank`'s hello, checked; WireError (or the TestbedError of a bad profile) if it is none."""
    msg = unpack(recv_bytes(rank, wait_s), key)
    if msg.kind != "hello":
        raise WireError(f"expected a hello, got a {msg.kind} message")
    raw = msg.meta.get("profile")
    profile = None if raw is None else profile_from_dict(raw, f"rank {rank}'s profile", info)
    return Hello(profile, memory_from_dict(msg.meta.get("memory"), f"rank {rank}'s memory"),
                 str(msg.meta.get("device", "")))


def time_link(rank: int) -> tuple[float, float]:
    """Echo the probes off `rank`: its link's bandwidth (Mbit/s) and latency (ms, one way)."""
    times = []
    for size in PROBES:
        start = time.perf_counter()
        send_bytes(memoryview(bytearray(size)), rank)
        recv_bytes(rank)
        times.append(time.perf_counter() - start)
    small, large = statistics.median(times[:SMALL]), statistics.median(times[SMALL:])
    # a large probe's round trip carries its bytes both ways, on top of a small one's latency
    return 2 * 8 * PROBES[-1] / max(large - small, 1e-9) / 1e6, 1000 * small / 2


def memory_from_dict(raw: object, source: str) -> MemoryMeasure | None:
    if raw is None:
        return None
    try:
        memory = MemoryMeasure(**raw)
        if not all(isinstance(v, (int, float)) and v >= 0 for v in dataclasses.astuple(memory)):
            raise ValueError("every figure must be a number >= 0")
    except (TypeError, ValueError) as exc:
        raise WireError(f"{source}: malformed: {exc}") from None
    return memory
