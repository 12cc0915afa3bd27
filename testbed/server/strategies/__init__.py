"""Strategies by name, as configs refer to them."""
from testbed.server.strategies.adaptive import Adaptive
from testbed.server.strategies.base import Context, Strategy
from testbed.server.strategies.droppeft import DropPEFT
from testbed.server.strategies.fedlora import FedLoRA
from testbed.server.strategies.fedpruner import FedPruner, FedPrunerFine
from testbed.server.strategies.hetlora import FlexLoRA, HetLoRA
from testbed.server.strategies.legend import Legend

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in [FedLoRA, HetLoRA, FlexLoRA, Legend, DropPEFT, FedPruner,
                                                                     FedPrunerFine, Adaptive]}

__all__ = ["STRATEGIES", "Context", "Strategy"]
