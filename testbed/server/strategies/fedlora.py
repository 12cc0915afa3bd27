"""FedLoRA: FedAvg on LoRA factors and the head, all layers at one rank (the baseline)."""
from __future__ import annotations

from testbed.core.plan import Plan, Update
from testbed.server.aggregate import Contribution, aggregate, average_head
from testbed.server.strategies.base import Strategy


class FedLoRA(Strategy):
    name = "fedlora"

    def plan(self, round: int, available: list[str]) -> dict[str, Plan]:
        rank = self.ctx.cfg.model.lora.rank
        ranks = {l: rank for l in range(self.ctx.model.num_layers)}
        return {d: self.base_plan(ranks) for d in self.sample(round, available)}

    def aggregate(self, round: int, updates: list[Update]) -> None:
        self.state.lora = aggregate(self.state.lora, contributions(updates), "fedavg")
        self.state.head = average_head([(u.samples, u.head) for u in updates])


def contributions(updates: list[Update]) -> dict[int, list[Contribution]]:
    """Per layer: each device's factors, weighted by samples x fraction of steps the layer was active."""
    per_layer: dict[int, list[Contribution]] = {}
    for u in updates:
        for layer, factors in u.lora.items():
            weight = u.samples * u.active_steps.get(layer, 0) / max(u.steps, 1)
            if weight > 0:
                per_layer.setdefault(layer, []).append(Contribution(weight, factors))
    return per_layer
