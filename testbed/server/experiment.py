"""What a run is made of once set up (`testbed.experiments.setup` builds it)."""
from __future__ import annotations

from dataclasses import dataclass

from testbed.core.config import ExperimentConfig
from testbed.core.devices import Device
from testbed.data import Dataset
from testbed.model.backbone import Backbone
from testbed.model.info import ModelInfo
from testbed.server.costmodel import CostModel


@dataclass
class Experiment:
    cfg: ExperimentConfig
    bb: Backbone
    info: ModelInfo
    data: Dataset
    devices: dict[str, Device]
    cost: CostModel | None  # None in an agent process: only the aggregator plans
