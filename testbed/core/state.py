"""The global state of a run: per-layer LoRA at the maximum rank, and the head.

The round loop owns it; a strategy's `aggregate` returns a new one and never changes the one it
is given (frozen: its fields are not reassigned; its tensors are not written in place)."""
from __future__ import annotations

from dataclasses import dataclass

from testbed.core.plan import HeadState, LoraState, Plan


@dataclass(frozen=True)
class GlobalState:
    lora: LoraState  # every layer, at the maximum rank in use
    head: HeadState

    def downlink(self, plan: Plan, num_layers: int) -> LoraState:
        """The LoRA a plan needs: its shared and frozen layers only, each sliced to the plan's rank."""
        out = {}
        for l in plan.downlink(num_layers):
            r = plan.ranks[l]
            out[l] = {n: (t[:r] if n.endswith(".A") else t[:, :r]).contiguous() for n, t in self.lora[l].items()}
        return out
