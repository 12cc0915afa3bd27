"""Memory accounting: the exact training footprint, and the process's peak RSS.

The footprint is what training must hold at its peak: resident parameters, LoRA
gradients, optimizer state, and the tensors autograd saves for backward (counted
with saved_tensors_hooks, each storage once, parameters excluded since they are
already resident).
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch
from torch import nn

MB = 1024 * 1024


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward inside the ``with`` block."""

    def __init__(self, model: nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._params and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> "SavedTensorCounter":
        self._seen.clear()
        self.bytes = 0
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def training_footprint(model: nn.Module, saved_bytes: int, optimizer_states_per_param: int = 2) -> int:
    """Resident parameters + gradients and optimizer state of trainable ones + saved activations."""
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return resident + trainable * (1 + optimizer_states_per_param) + saved_bytes


def peak_cuda_mb() -> float:
    """Peak CUDA memory allocated by torch in this process (0 without CUDA)."""
    return torch.cuda.max_memory_allocated() / MB if torch.cuda.is_available() else 0.0


def peak_rss_mb() -> float:
    """The process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


@dataclass
class Activations:
    """Bytes autograd saves per token: per layer at or above the lowest LoRA layer, and fixed."""

    per_layer: float
    fixed: float


def measure_activations(bb, lora_cfg, seq_len: int, batch: int = 2) -> Activations:
    """Count saved bytes for one step with LoRA on every layer and on the top layer only."""
    from testbed.model import lora_applied

    ids = torch.full((batch, seq_len), bb.model.config.pad_token_id or 0, dtype=torch.long)
    ids[:, : seq_len // 2] = 1000 % bb.model.config.vocab_size
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(batch, dtype=torch.long)}
    saved = []
    for layers in (range(bb.num_layers), [bb.num_layers - 1]):
        with lora_applied(bb, {l: lora_cfg.rank for l in layers}, lora_cfg) as model:
            model.train()  # as in training: dropout masks are saved too (their sizes do not depend on the RNG)
            with SavedTensorCounter(model) as counter:
                model(**inputs).loss
            saved.append(counter.bytes / (batch * seq_len))
    per_layer = (saved[0] - saved[1]) / max(bb.num_layers - 1, 1)
    return Activations(per_layer=per_layer, fixed=max(saved[1] - per_layer, 0.0))
