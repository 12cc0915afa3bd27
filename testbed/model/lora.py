"""LoRA surgery through peft: applied for one plan at a time, read, written and initialised per layer."""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator

import torch
from torch import nn

from testbed.core.config import LoraConfig
from testbed.core.errors import TestbedError
from testbed.core.plan import HeadState, LoraState
from testbed.model.backbone import Backbone
from testbed.model.info import ModelInfo


@contextlib.contextmanager
def lora_applied(bb: Backbone, ranks: dict[int, int], lora: LoraConfig) -> Iterator[nn.Module]:
    """Wrap the model with LoRA at the given per-layer ranks for the duration of the block."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = [_full(bb, l, m) for l, r in sorted(ranks.items()) if r > 0 for m in bb.modules[l]]
    if not names:
        yield bb.model
        return
    rank_of = {_full(bb, l, m): r for l, r in ranks.items() if r > 0 for m in bb.modules[l]}
    config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names,
        rank_pattern={n: r for n, r in rank_of.items()},
        alpha_pattern={n: bb.scaling * r for n, r in rank_of.items()},
        fan_in_fan_out=bb.model.config.model_type == "gpt2",
    )
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(bb.model, config)
    try:
        yield peft_model
    finally:
        peft_model.base_model.unload()  # put the original modules back
        bb.model.requires_grad_(False)

def _full(bb: Backbone, layer: int, module: str) -> str:
    return f"{bb.layers_path}.{layer}.{module}"

_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<layer>\d+)\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")

def get_lora(bb: Backbone, peft_model: nn.Module) -> LoraState:
    """A copy of the wrapped model's factors, on the model's device."""
    from peft import get_peft_model_state_dict

    state: LoraState = {}
    for key, tensor in get_peft_model_state_dict(peft_model).items():
        m = _KEY.match(key)
        if not m or m["path"] != bb.layers_path:
            raise TestbedError(f"unexpected LoRA key {key!r}")
        state.setdefault(int(m["layer"]), {})[f"{m['module']}.{m['ab']}"] = tensor.detach().clone()
    return state

def freeze_lora(bb: Backbone, peft_model: nn.Module, layers: list[int]) -> None:
    """Keep these layers' LoRA out of training: it still runs, but gets no gradient."""
    prefixes = tuple(f"base_model.model.{bb.layers_path}.{l}." for l in layers)
    for name, p in peft_model.named_parameters():
        if ".lora_" in name and name.startswith(prefixes):
            p.requires_grad_(False)

def set_lora(bb: Backbone, peft_model: nn.Module, state: LoraState) -> None:
    """Load per-layer factors into the wrapped model; every key must land."""
    from peft import set_peft_model_state_dict

    sd = {}
    for layer, tensors in state.items():
        for name, tensor in tensors.items():
            module, ab = name.rsplit(".", 1)
            sd[f"base_model.model.{_full(bb, layer, module)}.lora_{ab}.weight"] = tensor
    result = set_peft_model_state_dict(peft_model, sd)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    for problem, keys in (("does not fit the plan", result.unexpected_keys), ("lacks", missing)):
        if keys:
            raise TestbedError(f"LoRA state {problem}: {keys[0]} ({len(keys)} keys)")

def get_head(bb: Backbone) -> HeadState:
    return {n: p.detach().clone() for n, p in bb.head_params().items()}

def set_head(bb: Backbone, head: HeadState) -> None:
    params = bb.head_params()
    with torch.no_grad():
        for name, tensor in head.items():
            params[name].copy_(tensor)

def init_lora(info: ModelInfo, layers: list[int], rank: int, seed: int) -> LoraState:
    """Fresh factors as peft initialises them: A Kaiming-uniform, B zero (so dW starts at 0).

    Seeded per layer, so a device that keeps a layer personal starts it exactly where
    the aggregator's global state starts it.
    """
    state: LoraState = {}
    for layer in layers:
        gen = torch.Generator().manual_seed(seed * 1009 + layer)
        tensors = {}
        for m in info.modules[layer]:
            out_f, in_f = info.shapes[m]
            bound = 1 / in_f ** 0.5  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
            tensors[f"{m}.A"] = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
            tensors[f"{m}.B"] = torch.zeros(out_f, rank)
        state[layer] = tensors
    return state
