"""Everything a run needs before its first round: config, data, model, devices."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from testbed.config import ExperimentConfig
from testbed.costmodel import CostModel
from testbed.data import Dataset, load_splits, partition, tokenize
from testbed.devices import Device, devices_from_config
from testbed.memory import measure_activations
from testbed.model import Backbone, ModelInfo, load_backbone, model_info


@dataclass
class Experiment:
    cfg: ExperimentConfig
    bb: Backbone
    info: ModelInfo
    data: Dataset
    devices: dict[str, Device]
    cost: CostModel


def setup(cfg: ExperimentConfig) -> Experiment:
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    devices = {d.name: d for d in devices_from_config(cfg.devices)}
    train, test, num_labels = load_splits(cfg.data, cfg.seed)
    shards = partition(train.labels, list(devices), cfg.data, cfg.seed)  # before the slow model load
    bb = load_backbone(cfg.model, num_labels, cfg.seed)
    data = Dataset(tokenize(bb.tokenizer, train, cfg.model.max_length),
                   tokenize(bb.tokenizer, test, cfg.model.max_length),
                   num_labels, shards, cfg.data.source == "synthetic")
    info = model_info(bb)
    activations = measure_activations(bb, cfg.model.lora, cfg.model.max_length)
    head_shapes = {n: tuple(p.shape) for n, p in bb.head_params().items()}
    cost = CostModel(info, cfg.model.max_length, activations, head_shapes, getattr(torch, cfg.wire.dtype))
    return Experiment(cfg, bb, info, data, devices, cost)
