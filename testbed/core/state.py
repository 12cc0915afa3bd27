"""The aggregator's global state: per-layer LoRA at the maximum rank, and the head."""
from __future__ import annotations

from dataclasses import dataclass

from testbed.core.plan import HeadState, LoraState, Plan


@dataclass
class GlobalState:
    lora: LoraState  # every layer, at the maximum rank in use
    head: HeadState
    round: int = 0

    def downlink(self, plan: Plan, num_layers: int) -> LoraState:
        """The LoRA a plan needs: its shared and frozen layers only, each sliced to the plan's rank."""
        out = {}
        for l in plan.downlink(num_layers):
            r = plan.ranks[l]
            out[l] = {n: (t[:r] if n.endswith(".A") else t[:, :r]).contiguous() for n, t in self.lora[l].items()}
        return out

    def ranks(self) -> dict[int, int]:
        return {l: next(t.shape[0] for n, t in ts.items() if n.endswith(".A")) for l, ts in self.lora.items()}
