"""Everything a run needs before its first round: config, data, model, devices."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from testbed.core.config import CAUSAL_LM, ExperimentConfig, ModelConfig
from testbed.core.devices import Device, devices_from_config
from testbed.core.errors import TestbedError
from testbed.core.hub import check_model_name
from testbed.data import (Dataset, Shard, Split, Splits, Tokens, load_splits,
                          partition, tokenize, tokenize_instructions)
from testbed.measure.activations import measure_activations
from testbed.measure.cores import cpu_load
from testbed.measure.profiler import (DeviceProfile, analytic_profile,
                                      fingerprint, load_profile)
from testbed.model.info import ModelInfo, model_info
from testbed.model.load import load_backbone
from testbed.model.placement import DTYPES, Placement, model_placement, place
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


def measured_devices(devices: dict[str, Device], reference: DeviceProfile, info: ModelInfo, precision: str) -> None:
    """Devices described by a profile measured on them (`profile`): their speed relative to the
    reference profile, and their link where the profile measured one.  The profile must be
    measured at the run's precision, for its speed is that precision's."""
    for d in devices.values():
        if d.profile:
            measured = load_profile(Path(d.profile), info)  # refused if measured on another model
            if measured.precision != precision:
                raise TestbedError(f"{d.profile}: measured at {measured.precision}, and the run trains in "
                                   f"{precision} (train.precision): measure {d.name} with "
                                   f"`testbed profile --precision {precision}`")
            d.speed = measured.speed(reference)
            if measured.bandwidth_mbit:
                d.bandwidth_mbit, d.latency_ms = measured.bandwidth_mbit, measured.latency_ms


def set_threads(cfg: ModelConfig) -> None:
    """torch's threads: `model.threads`, or with 0 the cores other processes leave free.  One line
    on stderr when the CPU is oversubscribed, save with an explicit 1 (nothing left to lower)."""
    if cfg.threads == 1:
        torch.set_num_threads(1)
        return
    load = cpu_load()
    threads = cfg.threads or load.free
    torch.set_num_threads(threads)
    if load.oversubscribed(threads):
        quota = f" (cgroup quota {load.quota:g})" if load.quota else ""
        seen = (f"the CPU is oversubscribed: other processes keep {load.others:.1f} threads runnable "
                f"on the {load.cores} CPUs this run may use{quota}")
        if cfg.threads:
            print(f"testbed: warning: {seen}, and model.threads is {threads}: threads that share a core wait "
                  "for each other (model.threads: 0 takes only the free cores)", file=sys.stderr)
        else:
            print(f"testbed: warning: {seen}: running 1 torch thread (model.threads: 0, auto), slower than "
                  "on a quiet machine", file=sys.stderr)


def uses_chat(cfg: ExperimentConfig, tokenizer, quiet: bool) -> bool:
    """Whether causal-LM prompts go through the tokenizer's chat template (`data.chat`, if it has one)."""
    if cfg.task != CAUSAL_LM or not cfg.data.chat:
        return False
    if getattr(tokenizer, "chat_template", None):
        return True
    if not quiet:
        print(f"testbed: {cfg.model.name} has no chat template: prompts are plain text (data.chat)", file=sys.stderr)
    return False


def tokens(cfg: ExperimentConfig, tokenizer, split: Split, chat: bool, options: list[str] | None) -> Tokens:
    if cfg.task == CAUSAL_LM:
        return tokenize_instructions(tokenizer, split, cfg.model.max_length, chat, options)
    return tokenize(tokenizer, split, cfg.model.max_length)


@dataclass
class Inputs:
    """What a run is checked against before its model loads."""

    devices: dict[str, Device]
    splits: Splits
    shards: dict[str, Shard]
    placement: Placement  # the device and precision, checked on this machine


def check_inputs(cfg: ExperimentConfig) -> Inputs:
    """Every check that needs no model (`testbed check`, and a run before its slow model load):
    the devices, the strategy's options, the data (files, columns, labels; the proxy set) and its
    shards, and that the model can be found."""
    devices = {d.name: d for d in devices_from_config(cfg.devices, precision=cfg.train.precision)}
    STRATEGIES[cfg.strategy.name].check_options(cfg)
    splits = load_splits(cfg.data, cfg.seed, cfg.task)
    shards = partition(splits.train.labels, list(devices), cfg.data, cfg.seed)
    for name, shard in shards.items():
        devices[name].val_rows = len(shard.val)
    check_model_name(cfg.model.name)
    placement = model_placement(cfg.model.device, cfg.train.precision)  # a device or precision this machine lacks
    return Inputs(devices, splits, shards, placement)


def setup(cfg: ExperimentConfig, agent: bool = False, inputs: Inputs | None = None) -> Experiment:
    """`agent`: for an agent process, whose backbone reads layers only when a plan runs them.
    `inputs`: check_inputs(cfg), where the caller has it already."""
    set_threads(cfg.model)
    inputs = inputs or check_inputs(cfg)
    devices, splits = inputs.devices, inputs.splits
    if splits.label_names and not agent:
        print("testbed: labels " + ", ".join(f"{n}={i}" for i, n in enumerate(splits.label_names)), file=sys.stderr)
    bb = load_backbone(cfg.model, splits.num_labels, cfg.seed, resident=not agent, task=cfg.task)
    bb.placement = inputs.placement
    place(bb.model, bb.head_params(), bb.placement.device, DTYPES[cfg.model.dtype])
    chat = uses_chat(cfg, bb.tokenizer, quiet=agent)
    # The proxy set is only for the server's probes: an agent does not tokenize it.
    proxy = None if agent or splits.proxy is None else tokens(cfg, bb.tokenizer, splits.proxy, chat, splits.options)
    data = Dataset(tokens(cfg, bb.tokenizer, splits.train, chat, splits.options),
                   tokens(cfg, bb.tokenizer, splits.test, chat, splits.options),
                   splits.num_labels, inputs.shards, cfg.data.source == "synthetic", splits.label_names, proxy)
    info = model_info(bb)
    if agent:
        return Experiment(cfg, bb, info, data, devices, None)
    activations = measure_activations(bb, cfg.model.lora, cfg.model.max_length)
    head_shapes = {n: tuple(p.shape) for n, p in bb.head_params().items()}
    profile = reference_profile(cfg.model, info)
    measured_devices(devices, profile, info, cfg.train.precision)
    choices = data.train.choices  # options of several tokens take a scoring pass of their own
    passes = 2 if choices is not None and any(len(o) > 1 for o in choices.options) else 1
    cost = CostModel(info, cfg.model.max_length, activations, head_shapes, profile, getattr(torch, cfg.wire.dtype),
                     DTYPES[cfg.model.dtype], cfg.train.precision, passes)
    return Experiment(cfg, bb, info, data, devices, cost)
