"""Everything a run needs before its first round: config, data, model, devices."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from testbed.core.config import ExperimentConfig, ModelConfig
from testbed.core.devices import Device, devices_from_config
from testbed.core.hub import check_model_name
from testbed.data import (Dataset, Shard, Split, load_splits, partition,
                          tokenize)
from testbed.measure.activations import measure_activations
from testbed.measure.profiler import (DeviceProfile, analytic_profile,
                                      fingerprint, load_profile)
from testbed.model.info import ModelInfo, model_info
from testbed.model.load import load_backbone
from testbed.server.costmodel import REFERENCE_GFLOPS, CostModel
from testbed.server.experiment import Experiment
from testbed.server.strategies import STRATEGIES

PROFILES = Path(__file__).resolve().parents[2] / "inventory" / "profiles"


def reference_profile(cfg: ModelConfig, info: ModelInfo) -> DeviceProfile:
    """The profile device speeds are relative to: `model.profile`, else the one shipped for this
    model (if it was measured with the same LoRA targets), else one derived from FLOP counts."""
    if cfg.profile:
        return load_profile(Path(cfg.profile), info)
    shipped = PROFILES / f"{cfg.name}-reference.yaml"
    if shipped.is_file() and (profile := load_profile(shipped)).fingerprint == fingerprint(info):
        return profile
    return analytic_profile(info, cfg.name, cfg.max_length, REFERENCE_GFLOPS)


@dataclass
class Inputs:
    """What a run is checked against before its model loads."""

    devices: dict[str, Device]
    train: Split
    test: Split
    num_labels: int
    shards: dict[str, Shard]


def check_inputs(cfg: ExperimentConfig) -> Inputs:
    """Every check that needs no model (`testbed check`, and a run before its slow model load):
    the devices, the strategy's options, that the model can be found, the data (files, columns,
    labels) and its shards."""
    devices = {d.name: d for d in devices_from_config(cfg.devices)}
    STRATEGIES[cfg.strategy.name].check_options(cfg.strategy)
    check_model_name(cfg.model.name)
    train, test, num_labels = load_splits(cfg.data, cfg.seed)
    shards = partition(train.labels, list(devices), cfg.data, cfg.seed)
    return Inputs(devices, train, test, num_labels, shards)


def setup(cfg: ExperimentConfig, agent: bool = False, inputs: Inputs | None = None) -> Experiment:
    """`agent`: for an agent process, whose backbone reads layers only when a plan runs them.
    `inputs`: check_inputs(cfg), where the caller has it already."""
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    inputs = inputs or check_inputs(cfg)
    devices = inputs.devices
    bb = load_backbone(cfg.model, inputs.num_labels, cfg.seed, resident=not agent)
    data = Dataset(tokenize(bb.tokenizer, inputs.train, cfg.model.max_length),
                   tokenize(bb.tokenizer, inputs.test, cfg.model.max_length),
                   inputs.num_labels, inputs.shards, cfg.data.source == "synthetic")
    info = model_info(bb)
    if agent:
        return Experiment(cfg, bb, info, data, devices, None)
    activations = measure_activations(bb, cfg.model.lora, cfg.model.max_length)
    head_shapes = {n: tuple(p.shape) for n, p in bb.head_params().items()}
    profile = reference_profile(cfg.model, info)
    cost = CostModel(info, cfg.model.max_length, activations, head_shapes, profile, getattr(torch, cfg.wire.dtype))
    return Experiment(cfg, bb, info, data, devices, cost)
