"""Memory accounting: the exact training footprint, and the process's RSS.

The footprint is what training must hold at its peak: resident parameters, LoRA
gradients, optimizer state, and the tensors autograd saves for backward (counted
with saved_tensors_hooks, each storage once, parameters excluded since they are
already resident).

Peak RSS is per round where Linux lets a process reset its high-water mark
(`/proc/self/clear_refs`, since 4.0): an agent's figure then says what *this* round held,
not what joining or an earlier plan once did.  Elsewhere it is the lifetime peak.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path
from dataclasses import dataclass, field

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


STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> float | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """The process's peak resident set size since the last `reset_peak_rss` (else since it started)."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def rss_mb() -> float:
    """The process's resident set size now (0 where /proc is not)."""
    return (_status_kb("VmRSS") or 0.0) / 1024


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux); a no-op where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def release_freed() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so RSS falls."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@dataclass
class Activations:
    """Bytes autograd saves per token: per layer at or above the lowest LoRA layer, and fixed;
    per layer running one block only ("attn", "ffn"; where the model family's blocks are known)."""

    per_layer: float
    fixed: float
    per_block: dict[str, float] = field(default_factory=dict)


def measure_activations(bb, lora_cfg, seq_len: int, batch: int = 2) -> Activations:
    """Count saved bytes for one step with LoRA on every layer, on the top layer only, and on every
    layer running its attention block alone."""
    from testbed.model import lora_applied, running_layers

    ids = torch.full((batch, seq_len), bb.model.config.pad_token_id or 0, dtype=torch.long)
    ids[:, : seq_len // 2] = 1000 % bb.model.config.vocab_size
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(batch, dtype=torch.long)}
    n, saved = bb.num_layers, []
    every = list(range(n))
    runs = [(every, None), ([n - 1], None)] + ([(every, dict.fromkeys(every, "attn"))] if bb.blocks else [])
    for layers, blocks in runs:
        with lora_applied(bb, {l: lora_cfg.rank for l in layers}, lora_cfg) as model:
            model.train()  # as in training: dropout masks are saved too (their sizes do not depend on the RNG)
            with SavedTensorCounter(model) as counter, running_layers(bb, every, blocks):
                model(**inputs).loss
            saved.append(counter.bytes / (batch * seq_len))
    per_layer = (saved[0] - saved[1]) / max(n - 1, 1)
    fixed = max(saved[1] - per_layer, 0.0)
    per_block = {}
    if bb.blocks:
        attn = min(max((saved[2] - fixed) / n, 0.0), per_layer)
        per_block = {"attn": attn, "ffn": per_layer - attn}
    return Activations(per_layer=per_layer, fixed=fixed, per_block=per_block)
