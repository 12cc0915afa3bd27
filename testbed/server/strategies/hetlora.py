"""HetLoRA and FlexLoRA: one LoRA rank per device, by its capacity; all layers.

HetLoRA (Cho et al., 2024) aggregates zero-padded factors weighted by the norm of each
device's update; FlexLoRA (Bai et al., 2024) averages the full products and hands every
device the top singular directions at its rank.  Both assign ranks the same way here: the
fastest device gets `max_rank`, others a power of two in proportion to their speed.
"""
from __future__ import annotations

from testbed.core.plan import Plan
from testbed.core.state import GlobalState
from testbed.server.strategies.base import Strategy, base_plan


def pow2_floor(x: float) -> int:
    r = 1
    while r * 2 <= x:
        r *= 2
    return r


class HetLoRA(Strategy):
    name = "hetlora"

    @classmethod
    def max_rank(cls, cfg) -> int:
        return max([cfg.strategy.max_rank or cfg.model.lora.rank, *cfg.strategy.ranks.values()])

    def device_rank(self, device: str) -> int:
        d = self.ctx.devices[device]
        if d.device_class in self.opts.ranks:
            return self.opts.ranks[d.device_class]
        fastest = max(x.speed for x in self.ctx.devices.values())
        top = self.max_rank(self.ctx.cfg)
        return max(self.opts.min_rank, min(top, pow2_floor(top * d.speed / fastest)))

    def plan(self, round: int, available: list[str], state: GlobalState) -> dict[str, Plan]:
        layers = range(self.ctx.model.num_layers)
        return {d: base_plan(self.ctx.cfg, {l: self.device_rank(d) for l in layers})
                for d in self.sample(round, available)}

    def rule(self) -> str:
        return self.name  # each paper's own rule, named as the strategy


class FlexLoRA(HetLoRA):
    name = "flexlora"
