"""Memory accounting: the exact training footprint, and the process's peak RSS.

The footprint is what training must hold at its peak: resident parameters, LoRA
gradients, optimizer state, and the tensors autograd saves for backward (counted
with saved_tensors_hooks, each storage once, parameters excluded since they are
already resident).
"""
from __future__ import annotations

import resource
import sys

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


def peak_rss_mb() -> float:
    """The process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
