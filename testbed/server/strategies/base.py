"""The Strategy interface: server-side policy, blind to transports, processes and files."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from testbed.core.config import ExperimentConfig
from testbed.core.devices import Device
from testbed.core.plan import LayerProbe, Plan, Report, Update
from testbed.core.state import GlobalState
from testbed.model.info import ModelInfo
from testbed.server.costmodel import CostModel


@dataclass
class Context:
    """Everything a strategy may consult."""

    cfg: ExperimentConfig
    model: ModelInfo
    devices: dict[str, Device]
    samples: dict[str, int]  # training rows per device
    cost: CostModel
    probe: Callable[[GlobalState, int, bool], LayerProbe]  # the server's probe of the global model: rows, blocks


class Strategy:
    """plan -> (devices train) -> aggregate -> observe, once per round."""

    name = ""

    def __init__(self, ctx: Context, state: GlobalState):
        self.ctx = ctx
        self.opts = ctx.cfg.strategy
        self.state = state

    @classmethod
    def max_rank(cls, cfg: ExperimentConfig) -> int:
        """The rank the global state is kept at (the largest any device may train)."""
        return cfg.model.lora.rank

    def plan(self, round: int, available: list[str]) -> dict[str, Plan]:
        raise NotImplementedError

    def aggregate(self, round: int, updates: list[Update]) -> None:
        raise NotImplementedError

    def observe(self, round: int, reports: dict[str, Report], metrics: dict) -> None:
        """Feedback after a round; stateless strategies ignore it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # Helpers shared by strategies.

    def sample(self, round: int, available: list[str]) -> list[str]:
        k = self.opts.clients_per_round
        if not k or k >= len(available):
            return list(available)
        return sorted(random.Random(self.ctx.cfg.seed * 7919 + round).sample(available, k))

    def base_plan(self, ranks: dict[int, int], **fields) -> Plan:
        t = self.ctx.cfg.train
        fields.setdefault("validate", self.opts.validate)
        return Plan(ranks=ranks, local_steps=t.local_steps, batch_size=t.batch_size, lr=t.lr, **fields)
