"""LEGEND: per-device LoRA depth and rank distribution (reconstructed from arXiv 2412.20004).

A device trains LoRA only on its top `d` layers (backpropagation stops at the lowest of
them), with ranks that do not decrease toward the output.  Each round the configurator
sets a common deadline, the predicted round time of a reference device running the
baseline plan, and gives every device the configuration that trains the most LoRA
parameters (sum of ranks; then the deepest) that the cost model says meets the deadline and
fits its memory: a device that can run the baseline in time runs it unchanged.  Layers are aggregated
over the devices that hold LoRA there (`pad` by default: rank rows over their owners).

Below the depth a device runs the global LoRA frozen by default (`below: frozen`): it costs
bytes down and a little forward time but no backward, and keeps the device's model the
global one; without it, shallow devices train their top layers on features the global
model no longer produces, which slowed convergence in our study.
"""
from __future__ import annotations

import math
import statistics

from testbed.core.plan import Plan, Update
from testbed.server.aggregate import aggregate, average_head
from testbed.server.strategies.base import Strategy
from testbed.server.strategies.fedlora import contributions


def rank_distribution(depth: int, num_layers: int, low: int, high: int, profile: str) -> dict[int, int]:
    """Ranks for the top `depth` layers, non-decreasing toward the output (powers of two)."""
    ranks = dict.fromkeys(range(num_layers), 0)
    for k, layer in enumerate(range(num_layers - depth, num_layers)):
        if profile == "uniform" or low >= high:
            ranks[layer] = high
        else:
            target = low + (high - low) * (k + 1) / depth
            ranks[layer] = min(high, 2 ** round(math.log2(target)))
    return ranks


class Legend(Strategy):
    name = "legend"

    @classmethod
    def max_rank(cls, cfg) -> int:
        return cfg.strategy.max_rank or cfg.model.lora.rank

    def plan(self, round: int, available: list[str]) -> dict[str, Plan]:
        chosen = self.sample(round, available)
        deadline = self.deadline(available)
        return {d: self.configure(d, deadline) for d in chosen}

    def baseline_seconds(self, devices: list[str]) -> dict[str, float]:
        """Each device's predicted round time running the baseline (all layers, one rank)."""
        rank = self.ctx.cfg.model.lora.rank
        baseline = self.base_plan(dict.fromkeys(range(self.ctx.model.num_layers), rank))
        return {d: self.ctx.cost.round_seconds(self.ctx.devices[d], baseline) for d in devices}

    def deadline(self, available: list[str]) -> float:
        """Predicted round time of the reference device running the baseline."""
        devices, times = self.ctx.devices, self.baseline_seconds(available)
        ref = self.opts.deadline_device
        if ref == "median":
            value = statistics.median_low(sorted(times.values()))
        elif ref in ("fastest", "slowest"):
            value = (min if ref == "fastest" else max)(times.values())
        else:
            of_class = [t for d, t in times.items() if devices[d].device_class == ref]
            value = min(of_class) if of_class else statistics.median_low(sorted(times.values()))
        return value * self.opts.deadline_factor

    def configure(self, device: str, deadline: float) -> Plan:
        """The plan that tunes the most LoRA parameters (the largest sum of ranks, then the deepest)
        within the deadline and the memory budget; if none does, the lightest."""
        dev, cost = self.ctx.devices[device], self.ctx.cost
        candidates = self.candidates()
        for plan in candidates:
            if cost.fits(dev, plan) and cost.round_seconds(dev, plan) <= deadline:
                return plan
        return min(candidates, key=lambda p: cost.round_seconds(dev, p))

    def candidates(self) -> list[Plan]:
        """Every depth with every ramp between powers of two, the most LoRA parameters first."""
        n, top = self.ctx.model.num_layers, self.max_rank(self.ctx.cfg)
        highs = [top >> k for k in range(top.bit_length()) if top >> k]
        shapes = set()
        for depth in range(n, self.opts.min_depth - 1, -1):
            for high in highs:
                lows = [high] if self.opts.rank_profile == "uniform" else [l for l in highs if l <= high]
                for low in lows:
                    if low >= min(self.opts.min_rank, high):
                        ranks = rank_distribution(depth, n, low, high, self.opts.rank_profile)
                        shapes.add((sum(ranks.values()), depth, tuple(ranks.values())))
        return [self.with_below(dict(enumerate(r)), d, top) for _, d, r in sorted(shapes, reverse=True)]

    def with_below(self, ranks: dict[int, int], depth: int, top: int) -> Plan:
        below = list(range(self.ctx.model.num_layers - depth))
        if self.opts.below == "none" or not below:
            return self.base_plan(ranks)
        return self.base_plan({**ranks, **dict.fromkeys(below, top)}, frozen=below)

    def aggregate(self, round: int, updates: list[Update]) -> None:
        self.state.lora = aggregate(self.state.lora, contributions(updates), self.opts.aggregation)
        self.state.head = average_head([(u.samples, u.head) for u in updates])
