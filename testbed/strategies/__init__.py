"""Strategies by name, as configs refer to them."""
from testbed.strategies.base import Context, Strategy
from testbed.strategies.fedlora import FedLoRA

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in [FedLoRA]}

__all__ = ["STRATEGIES", "Context", "Strategy"]
