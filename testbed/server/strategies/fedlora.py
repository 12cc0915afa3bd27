"""FedLoRA: FedAvg on LoRA factors and the head, all layers at one rank (the baseline)."""
from __future__ import annotations

from testbed.core.plan import Plan
from testbed.core.state import GlobalState
from testbed.server.strategies.base import Strategy, base_plan


class FedLoRA(Strategy):
    name = "fedlora"

    def plan(self, round: int, available: list[str], state: GlobalState) -> dict[str, Plan]:
        rank = self.ctx.cfg.model.lora.rank
        ranks = {l: rank for l in range(self.ctx.model.num_layers)}
        return {d: base_plan(self.ctx.cfg, ranks) for d in self.sample(round, available)}
