"""Loading a model (with a fresh classification head, or as a causal LM), and finding its transformer layers."""
from __future__ import annotations

import os

import torch
from torch import nn

from testbed.core.config import CAUSAL_LM, LoraConfig, ModelConfig
from testbed.core.errors import TestbedError
from testbed.core.hub import BUNDLED, BUNDLED_GGUF
from testbed.model.backbone import Backbone, LayerStore
from testbed.model.convert import converted
from testbed.model.families import default_targets


def resolve_model_path(name: str, cache_dir: str = "") -> str:
    """A model name as transformers loads it: a bundled model's directory (a GGUF one's converted
    copy in `cache_dir`), else the name itself (a hub id or a local directory)."""
    if name in BUNDLED:
        module = __import__(BUNDLED[name])
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model never needs the hub
        return module.get_model_path()
    if name in BUNDLED_GGUF:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return converted(name, cache_dir)
    return name


def load_backbone(cfg: ModelConfig, num_labels: int, seed: int, resident: bool = True,
                  task: str = "classification") -> Backbone:
    """The model with a fresh head (task causal_lm: with its own language-model head).
    `resident=False`: no transformer layer is read yet (they wait on the meta device for `hold`),
    so the process never holds layers no plan runs."""
    from transformers import (AutoConfig, AutoModelForCausalLM,
                              AutoModelForSequenceClassification,
                              AutoTokenizer)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialised head" notice is expected
    hf_logging.disable_progress_bar()
    path = resolve_model_path(cfg.name, cfg.cache_dir)
    auto = AutoModelForCausalLM if task == CAUSAL_LM else AutoModelForSequenceClassification
    torch.manual_seed(seed)  # the head's initial weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path, **({} if task == CAUSAL_LM else {"num_labels": num_labels}))
        n = config.num_hidden_layers
        if not resident:
            config.num_hidden_layers = 0  # from_pretrained then reads no layer's weights
        model = auto.from_pretrained(path, config=config, ignore_mismatched_sizes=True)  # a fresh head for this task
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline: HF_HUB_OFFLINE=1)" if offline else ""
        raise TestbedError(f"model.name: cannot load {cfg.name!r}{hint}: {str(exc).splitlines()[0]}") from None
    if resident:
        return wrap_model(model, tokenizer, cfg.lora, task)
    model.config.num_hidden_layers = n
    with torch.device("meta"):  # every layer's modules, with no memory behind their parameters
        skeleton = auto.from_config(model.config, dtype=model.dtype)
    layers_path, layers = find_layers(skeleton)
    parent_path, _, attr = layers_path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, layers.train(model.training))
    bb = wrap_model(model, tokenizer, cfg.lora, task)
    bb.store = LayerStore.open(path, bb, model.base_model_prefix)
    return bb


def wrap_model(model: nn.Module, tokenizer: object, lora: LoraConfig, task: str = "classification") -> Backbone:
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
        if tokenizer.eos_token is None:
            raise TestbedError("model.name: the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only families ship without one
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    path, layers = find_layers(model)
    targets = lora.targets
    if targets == ["auto"]:
        targets = default_targets(model.config.model_type)
        if targets is None:
            raise TestbedError(f"model.lora.targets: no default for model type "
                               f"{model.config.model_type!r}; name the modules")
    modules = {i: _target_modules(layer, targets) for i, layer in enumerate(layers)}
    if not any(modules.values()):
        raise TestbedError(f"model.lora.targets: none of {targets} found in the model's layers")
    return Backbone(model, tokenizer, path, len(layers), modules, lora.alpha / lora.rank, task=task)


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the transformer layers (BERT, RoBERTa, DistilBERT, LLaMA, Qwen2, GPT-2, OPT...)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.split(".")[-1] in ("layer", "layers", "h"):
            return name, module
    raise TestbedError(f"model: cannot find the list of {n} transformer layers in {type(model).__name__}")


def _target_modules(layer: nn.Module, targets: list[str]) -> list[str]:
    return [name for name, m in layer.named_modules()
            if name.split(".")[-1] in targets and isinstance(m, nn.Module) and hasattr(m, "weight")]
