"""Transports move Plans down and Updates up.  The aggregator loop is the same for all.

`InProcess` runs every agent in this process, one after another: the embedded
default.  It still counts the bytes a real transport would send.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from agents.agent import Agent
from testbed.plan import HeadState, LoraState, Plan, Update


@dataclass
class Job:
    plan: Plan
    lora: LoraState
    head: HeadState


@dataclass
class Failure:
    round: int
    device: str
    kind: str  # "crash", "timeout", "oom", "rejected"
    detail: str


@dataclass
class RoundResult:
    updates: dict[str, Update] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)


class Transport(Protocol):
    def run_round(self, round: int, jobs: dict[str, Job]) -> RoundResult: ...

    def close(self) -> None: ...


def tensor_bytes(lora: LoraState, head: HeadState) -> int:
    return (sum(t.numel() * t.element_size() for ts in lora.values() for t in ts.values())
            + sum(t.numel() * t.element_size() for t in head.values()))


class InProcess:
    def __init__(self, agents: dict[str, Agent]):
        self.agents = agents

    def run_round(self, round: int, jobs: dict[str, Job]) -> RoundResult:
        result = RoundResult()
        for device, job in jobs.items():
            update = self.agents[device].run(round, job.plan, job.lora, job.head)
            update.report.bytes_down = tensor_bytes(job.lora, job.head)
            update.report.bytes_up = tensor_bytes(update.lora, update.head)
            result.updates[device] = update
        return result

    def close(self) -> None:
        pass
