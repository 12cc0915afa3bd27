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

from testbed.core.config import ExperimentConfig
from testbed.core.plan import Plan
from testbed.core.state import GlobalState
from testbed.server.strategies.base import Context, Strategy, base_plan


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


def top_rank(cfg: ExperimentConfig) -> int:
    """The rank of the top layer at full ramp (the largest any device trains)."""
    return cfg.strategy.max_rank or cfg.model.lora.rank


def candidates(ctx: Context) -> list[Plan]:
    """Every depth with every ramp between powers of two, the most LoRA parameters first
    (`ctx.cfg.strategy` holds LEGEND's options)."""
    opts, n, top = ctx.cfg.strategy, ctx.model.num_layers, top_rank(ctx.cfg)
    highs = [top >> k for k in range(top.bit_length()) if top >> k]
    shapes = set()
    for depth in range(n, opts.min_depth - 1, -1):
        for high in highs:
            lows = [high] if opts.rank_profile == "uniform" else [l for l in highs if l <= high]
            for low in lows:
                if low >= min(opts.min_rank, high):
                    ranks = rank_distribution(depth, n, low, high, opts.rank_profile)
                    shapes.add((sum(ranks.values()), depth, tuple(ranks.values())))
    return [with_below(ctx, dict(enumerate(r)), d, top) for _, d, r in sorted(shapes, reverse=True)]


def with_below(ctx: Context, ranks: dict[int, int], depth: int, top: int) -> Plan:
    """The plan of a depth; the layers below it run the global LoRA frozen unless `below: none`."""
    below = list(range(ctx.model.num_layers - depth))
    if ctx.cfg.strategy.below == "none" or not below:
        return base_plan(ctx.cfg, ranks)
    return base_plan(ctx.cfg, {**ranks, **dict.fromkeys(below, top)}, frozen=below)


def baseline_seconds(ctx: Context, devices: list[str], validate: bool = False) -> dict[str, float]:
    """Each device's predicted round time running the baseline (all layers, one rank), with
    validation where the strategy's plans validate."""
    baseline = base_plan(ctx.cfg, dict.fromkeys(range(ctx.model.num_layers), ctx.cfg.model.lora.rank),
                         validate=validate or ctx.cfg.strategy.validate)
    return {d: ctx.cost.round_seconds(ctx.devices[d], baseline) for d in devices}


def round_deadline(ctx: Context, available: list[str], validate: bool = False) -> float:
    """The round's deadline: the predicted round time of the reference device running the
    baseline, times `deadline_factor`."""
    opts, times = ctx.cfg.strategy, baseline_seconds(ctx, available, validate)
    ref = opts.deadline_device
    if ref == "median":
        value = statistics.median_low(sorted(times.values()))
    elif ref in ("fastest", "slowest"):
        value = (min if ref == "fastest" else max)(times.values())
    else:
        of_class = [t for d, t in times.items() if ctx.devices[d].device_class == ref]
        value = min(of_class) if of_class else statistics.median_low(sorted(times.values()))
    return value * opts.deadline_factor


class Legend(Strategy):
    name = "legend"

    @classmethod
    def max_rank(cls, cfg) -> int:
        return top_rank(cfg)

    def plan(self, round: int, available: list[str], state: GlobalState) -> dict[str, Plan]:
        chosen = self.sample(round, available)
        deadline = round_deadline(self.ctx, available)
        return {d: self.configure(d, deadline) for d in chosen}

    def configure(self, device: str, deadline: float) -> Plan:
        """The plan that tunes the most LoRA parameters (the largest sum of ranks, then the deepest)
        within the deadline and the memory budget; if none does, the lightest."""
        dev, cost = self.ctx.devices[device], self.ctx.cost
        plans = candidates(self.ctx)
        for plan in plans:
            if cost.fits(dev, plan) and cost.round_seconds(dev, plan) <= deadline:
                return plan
        return min(plans, key=lambda p: cost.round_seconds(dev, p))

    def rule(self) -> str:
        return self.opts.aggregation
