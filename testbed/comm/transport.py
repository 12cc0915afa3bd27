"""Transports move Plans down and Updates up.  The aggregator loop is the same for all.

`InProcess` runs every agent in this process, one after another: the embedded
default.  Its messages still go through the Wire (packed, digested, unpacked), so byte
counts and half-precision transfer are exactly those of a real transport.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Protocol

import torch

from testbed.comm.framing import LENGTH_PREFIX
from testbed.comm.wire import (pack, plan_message, read_plan, read_update,
                               unpack, update_message)
from testbed.core.errors import OutOfMemory, TestbedError
from testbed.core.plan import Job, Update


@dataclass
class Failure:
    round: int
    device: str
    kind: str  # "crash", "timeout", "oom", "rejected", "join" (its rank never joined), "lost" (its rank failed
    # earlier); the aggregator's "restart"
    detail: str


@dataclass
class RoundResult:
    updates: dict[str, Update] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)


# A distributed run's checkpoint names the devices whose personal layers stayed in agent processes.
PERSONAL_ON_AGENTS = "personal_on_agents"


def refuse_lost_personal(state: dict) -> None:
    """Those agent processes end with the run: a resumed run could not continue exactly."""
    if lost := state.get(PERSONAL_ON_AGENTS):
        raise TestbedError(f"--resume: {', '.join(lost)} kept personal layers in agent processes that ended with "
                           "the run, so it cannot continue exactly (a distributed run resumes only without "
                           "personal layers, e.g. droppeft with personal_k: 0)")


class Runner(Protocol):
    """What runs a device's job: an agent (testbed.agent), or anything that answers like one."""

    def run(self, round: int, job: Job) -> Update: ...


class Transport(Protocol):
    def available(self, devices: list[str]) -> list[str]:
        """The devices that can still take part."""

    def run_round(self, round: int, jobs: dict[str, Job]) -> RoundResult: ...

    def state_dict(self) -> dict:
        """What the agents keep between rounds (personal layers) where this process holds it."""

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


class InProcess:
    def __init__(self, agents: dict[str, Runner], wire_dtype: torch.dtype = torch.float32):
        self.agents = agents
        self.dtype = wire_dtype
        self.key = secrets.token_bytes(32)

    def available(self, devices: list[str]) -> list[str]:
        return list(devices)

    def run_round(self, round: int, jobs: dict[str, Job]) -> RoundResult:
        result = RoundResult()
        for device, job in jobs.items():
            down = pack(plan_message(round, device, round, job.plan, job.lora, job.head), self.key, self.dtype)
            try:
                trained = self.agents[device].run(round, Job(*read_plan(unpack(down, self.key))))
            except OutOfMemory as exc:
                result.failures.append(Failure(round, device, "oom", str(exc)))
                continue
            up = pack(update_message(trained, round), self.key, self.dtype)
            update = read_update(unpack(up, self.key), self.dtype)
            update.report.bytes_down = LENGTH_PREFIX + len(down)  # as a stream transport sends them
            update.report.bytes_up = LENGTH_PREFIX + len(up)
            result.updates[device] = update
        return result

    def state_dict(self) -> dict:
        return {d: agent.personal for d, agent in self.agents.items()}

    def load_state_dict(self, state: dict) -> None:
        if PERSONAL_ON_AGENTS in state:  # a distributed run's checkpoint
            refuse_lost_personal(state)
            return
        for d, personal in state.items():
            self.agents[d].personal = personal

    def close(self) -> None:
        pass
