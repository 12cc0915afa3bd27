"""Joining a distributed run: what an agent rank says in its hello, and the link probes it echoes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from testbed.comm.wire import WireError
from testbed.measure.memory import MemoryMeasure
from testbed.measure.profiler import DeviceProfile

PROBES = (1,) * 5 + (1 << 20,) * 3  # echoed at join: latency from the small ones, bandwidth from the large

@dataclass
class Joined:
    """What rank 0 learnt about an agent rank when it joined."""

    rank: int
    devices: list[str]
    profile: DeviceProfile | None  # None when the agent was told not to profile
    bandwidth_mbit: float
    latency_ms: float
    memory: MemoryMeasure | None = None  # None from an agent that did not say

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
