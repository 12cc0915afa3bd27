"""LEGEND: per-device LoRA depth and rank distribution (reconstructed from arXiv 2412.20004).

The paper observes that LoRA layers near the output, at higher ranks, save resources at a
comparable accuracy.  A device therefore trains LoRA only on its top `d` layers (its depth:
backpropagation stops at the lowest of them), with ranks that rise toward the output (the
ramp: `min_rank` on the lowest LoRA layer up to `max_rank` on the top one, the ranks between
rising linearly, rounded to powers of two).  Each round the configurator sets a common
deadline, the predicted round time of a reference device running the baseline plan (FedLoRA's:
every layer at `model.lora.rank`), and gives every device, in the order of `choose`, the first
plan that the cost model says fits its memory and meets the deadline (none does: the fastest):

- `paper` (the default): the full ramp at each depth, the deepest first (down to `min_depth`),
  so a slower device gets a smaller depth; a device too slow for even `min_depth` at the full
  ramp gets the ramp with both ends halved (to no less than 1), again the deepest first, and so
  on down to rank 1.  A device that could run the baseline in time gets the full depth with the
  full ramp (no slower, with `max_rank` at `model.lora.rank`), not the baseline: the paper
  gives every device a depth and a rank distribution, and the ramp is its structure, not a
  fallback.  Every plan deeper than one layer therefore has the ramp's shape whenever the
  ramp's low end is below its high end.
- `ranks`: the plan that trains the most LoRA parameters (the largest sum of ranks, then the
  deepest) among every depth and every ramp between powers of two: a device that can run the
  baseline in time runs it unchanged (with `max_rank` at `model.lora.rank`), and a ramp appears
  only where no flat plan meets the deadline.

Below its depth a device runs no LoRA by default (`below: none`, as in the paper): nothing of
those layers is sent down.  `below: frozen` (not in the paper) runs the global LoRA there
frozen, sent down and run forward but not trained: the device's model stays the global one
(without it, a shallow device trains its top layers on features the global model no longer
produces, which slowed convergence in an earlier study), but a shallow device's downlink is
then mostly LoRA it does not train (88 % of a TX2's in that study).  Layers are aggregated
over the devices that hold LoRA there (`pad` by default: rank rows over their owners).
"""
from __future__ import annotations

import math
import statistics

from testbed.core.config import ExperimentConfig
from testbed.core.plan import Plan
from testbed.core.state import GlobalState
from testbed.server.strategies.base import Context, Strategy, base_plan


def ramp(depth: int, low: int, high: int) -> list[int]:
    """`depth` ranks from the lowest LoRA layer up: `low` to `high` (the ends exact, so the ramp
    rises whenever low < high), the ranks between rising linearly, rounded to powers of two."""
    if depth == 1:
        return [high]
    between = [low + (high - low) * k / (depth - 1) for k in range(1, depth - 1)]
    return [low, *(min(high, max(low, 2 ** round(math.log2(t)))) for t in between), high]


def top_rank(cfg: ExperimentConfig) -> int:
    """The rank of the top layer at full ramp (the largest any device trains)."""
    return cfg.strategy.max_rank or cfg.model.lora.rank


def depths(ctx: Context) -> range:
    """The depths a device may train, the deepest first."""
    n = ctx.model.num_layers
    return range(n, min(ctx.cfg.strategy.min_depth, n) - 1, -1)


def candidates(ctx: Context) -> list[Plan]:
    """Every depth with every ramp between powers of two, the most LoRA parameters first (then
    the deepest): the order of `choose: ranks`."""
    opts, top = ctx.cfg.strategy, top_rank(ctx.cfg)
    highs = [top >> k for k in range(top.bit_length()) if top >> k]
    shapes = set()
    for depth in depths(ctx):
        for high in highs:
            lows = [high] if opts.rank_profile == "uniform" else [l for l in highs if l <= high]
            for low in lows:
                if low >= min(opts.min_rank, high):
                    ranks = tuple(ramp(depth, low, high))
                    shapes.add((sum(ranks), depth, ranks))
    return [structure(ctx, list(ranks)) for *_, ranks in sorted(shapes, reverse=True)]


def ramps(ctx: Context) -> list[tuple[int, int]]:
    """The (low, high) ends of the ramps `choose: paper` tries: the full ramp, then each with
    both ends halved (to no less than 1), down to rank 1."""
    opts, high = ctx.cfg.strategy, top_rank(ctx.cfg)
    low = high if opts.rank_profile == "uniform" else min(opts.min_rank, high)
    out = [(low, high)]
    while high > 1:
        low, high = max(low // 2, 1), high // 2
        out.append((low, high))
    return out


def paper_plans(ctx: Context) -> list[Plan]:
    """The order of `choose: paper`: each ramp of `ramps` (the full one first) at every depth,
    the deepest first."""
    return [structure(ctx, ramp(d, low, high)) for low, high in ramps(ctx) for d in depths(ctx)]


def structure(ctx: Context, lora: list[int]) -> Plan:
    """The plan with LoRA at these ranks on the top layers (the lowest first), none below them
    or, with `below: frozen`, the global LoRA (at the top rank) frozen."""
    n, depth = ctx.model.num_layers, len(lora)
    below = list(range(n - depth))
    ranks = dict(enumerate(lora, start=n - depth))
    if ctx.cfg.strategy.below == "none" or not below:
        return base_plan(ctx.cfg, {**dict.fromkeys(below, 0), **ranks})
    return base_plan(ctx.cfg, {**dict.fromkeys(below, top_rank(ctx.cfg)), **ranks}, frozen=below)


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

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.order = paper_plans(ctx) if self.opts.choose == "paper" else candidates(ctx)  # what configure tries

    @classmethod
    def max_rank(cls, cfg) -> int:
        return top_rank(cfg)

    def plan(self, round: int, available: list[str], state: GlobalState) -> dict[str, Plan]:
        chosen = self.sample(round, available)
        deadline = round_deadline(self.ctx, available)
        return {d: self.configure(d, deadline) for d in chosen}

    def configure(self, device: str, deadline: float) -> Plan:
        """The first plan of `choose`'s order that fits the device's memory and meets the
        deadline; if none does, the fastest."""
        dev, cost = self.ctx.devices[device], self.ctx.cost
        for plan in self.order:
            if cost.fits(dev, plan) and cost.round_seconds(dev, plan) <= deadline:
                return plan
        return min(self.order, key=lambda p: cost.round_seconds(dev, p))

    def rule(self) -> str:
        return self.opts.aggregation
