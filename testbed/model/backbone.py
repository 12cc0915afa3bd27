"""A loaded model and what we know about its layout; where its non-resident layers are read from."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from testbed.core.config import CAUSAL_LM
from testbed.core.errors import TestbedError
from testbed.model.families import BLOCKS
from testbed.model.placement import Placement


@dataclass
class Backbone:
    """A loaded model (with a classification head, or a causal LM's own head) and what we know
    about its layout."""

    model: nn.Module
    tokenizer: object
    layers_path: str  # dotted path of the transformer layer ModuleList, e.g. "bert.encoder.layer"
    num_layers: int
    modules: dict[int, list[str]]  # per layer: LoRA target module paths inside the layer
    scaling: float  # alpha / rank, common to every device
    store: "LayerStore | None" = None  # where non-resident layers are read from (None: all resident)
    placement: Placement = field(default_factory=Placement)  # its device and precision
    task: str = "classification"  # or "causal_lm" (see testbed.core.config.TASKS)

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

    def stand_in_labels(self, ids: torch.Tensor) -> torch.Tensor:
        """Labels for a step on made-up `ids` (measuring, profiling): class 0 for every row, or
        for a causal LM the ids themselves (every token a target)."""
        return ids.clone() if self.task == CAUSAL_LM else torch.zeros(len(ids), dtype=torch.long)

    def head_params(self) -> dict[str, nn.Parameter]:
        """The classifier head: every parameter outside the backbone.  A causal LM has none: its
        language-model head is pretrained (and often the embeddings, tied) and stays frozen."""
        if self.task == CAUSAL_LM:
            return {}
        prefix = self.model.base_model_prefix + "."
        return {n: p for n, p in self.model.named_parameters()
                if not n.startswith(prefix) and "lora_" not in n}

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
