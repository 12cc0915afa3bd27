"""Strategies by name, as configs refer to them."""
from testbed.strategies.adaptive import Adaptive
from testbed.strategies.base import Context, Strategy
from testbed.strategies.droppeft import DropPEFT
from testbed.strategies.fedlora import FedLoRA
from testbed.strategies.fedpruner import FedPruner, FedPrunerFine
from testbed.strategies.hetlora import FlexLoRA, HetLoRA
from testbed.strategies.legend import Legend

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in [FedLoRA, HetLoRA, FlexLoRA, Legend, DropPEFT, FedPruner,
                                                                     FedPrunerFine, Adaptive]}

__all__ = ["STRATEGIES", "Context", "Strategy"]
