"""Memory accounting: the exact training footprint, and the process's RSS.

The footprint is what training must hold at its peak: resident parameters, LoRA
gradients, optimizer state, and the tensors autograd saves for backward (counted
with saved_tensors_hooks, each storage once, parameters excluded since they are
already resident).  Every tensor counts at its own dtype: a half-precision base
(`model.dtype`), float32 LoRA, and under autocast (`train.precision`) half-precision
activations and the casts of float32 weights that backward keeps.

Peak RSS is per round where Linux lets a process reset its high-water mark
(`/proc/self/clear_refs`, since 4.0): an agent's figure then says what *this* round held,
not what joining or an earlier plan once did.  Elsewhere it is the lifetime peak.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from testbed.core.errors import OutOfMemory
from testbed.measure.cgroups import cgroup_dirs

MIB = 1 << 20  # every memory (and traffic) figure is in MiB; keys ending in _mb hold MiB


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
        return t.detach()  # not t: a node saving its own output would hold itself (a cycle gc cannot see)

    def __enter__(self) -> "SavedTensorCounter":
        self._seen.clear()
        self.bytes = 0
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of these tensors' elements, each at its own dtype."""
    return sum(t.numel() * t.element_size() for t in tensors)


def training_footprint(model: nn.Module, saved_bytes: int, optimizer_states_per_param: int = 2) -> int:
    """Resident parameters + gradients and optimizer state of trainable ones + saved activations."""
    resident = nbytes(model.parameters())
    trainable = nbytes(p for p in model.parameters() if p.requires_grad)
    return resident + trainable * (1 + optimizer_states_per_param) + saved_bytes


def reset_peak_cuda(device: torch.device) -> None:
    """Start a new peak window of torch's CUDA allocator on `device` (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_cuda_mb(device: torch.device) -> float:
    """Peak CUDA memory torch allocated on `device` since `reset_peak_cuda` (0 off CUDA).  On a
    Jetson (unified memory, where nvidia-smi shows none) it is the same allocator's figure, and
    the process's RSS holds these allocations too."""
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else 0.0


def peak_cuda_reserved_mb(device: torch.device) -> float | None:
    """Peak CUDA memory torch's caching allocator held (allocated and cached) on `device` since
    `reset_peak_cuda`: what other processes could not have (None off CUDA)."""
    return torch.cuda.max_memory_reserved(device) / MIB if device.type == "cuda" else None


def device_out_of_memory(device: torch.device, error: str) -> OutOfMemory:
    """A real out-of-memory of `device` as a round's OutOfMemory, with the peak it reached; the
    allocator's cache is released (call it once the failed round's tensors are gone), so that the
    agent goes on serving."""
    peak = peak_cuda_mb(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    at = f" at a peak of {peak:.0f} MiB allocated" if peak else ""
    return OutOfMemory(f"{device} ran out of memory{at}: {error}")


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
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def rss_mb() -> float:
    """The process's resident set size now (0 where /proc is not)."""
    return (_status_kb("VmRSS") or 0.0) / 1024


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux); a no-op where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# -- the memory a process may use, and whether the kernel killed for it --------------------------

UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return UNLIMITED if text == "max" else int(text) if text.isdigit() else None


def memory_limit_mb() -> float:
    """The memory this process may use: the least of its cgroups' limits and the machine's RAM."""
    limits = [_read_number(d / name) for d in cgroup_dirs("memory") for name in ("memory.limit_in_bytes", "memory.max")]
    total_kb = 0.0
    try:
        total_kb = next(float(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                        if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    found = [b / MIB for b in limits if b and b < UNLIMITED] + ([total_kb / 1024] if total_kb else [])
    return min(found, default=0.0)


def oom_kills() -> int:
    """Processes the kernel's OOM killer has killed in this process's memory cgroup (with its
    descendants), or on the machine where the cgroup has no count: a rise across a process's
    life, when it died of SIGKILL, says the OOM killer took it."""
    for d in cgroup_dirs("memory")[:1]:
        for name in ("memory.events", "memory.oom_control"):  # v2, v1 (kernel 4.13+)
            try:
                for line in (d / name).read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
            except OSError:
                continue
    try:
        return next(int(line.split()[1]) for line in Path("/proc/vmstat").read_text().splitlines()
                    if line.startswith("oom_kill "))
    except (OSError, StopIteration):
        return 0


@dataclass
class MemoryMeasure:
    """What an agent measured of its memory when it joined (MiB; host RAM, or a discrete GPU's
    memory where its model is on one), and the training budget that follows: the counted
    footprint (what the CostModel predicts) that keeps its real peak RSS inside its limit.  Real
    RSS exceeds the count by the interpreter and libraries (in `base`) and by allocator slack and
    backward's temporaries, which grow with the count; `peak` and `counted` of one profiled step
    give that growth (one point, so it is overstated for small plans: the safe side)."""

    limit_mb: float  # the least of the process's cgroup limits and the machine's RAM
    base_mb: float  # RSS with the model loaded but no transformer layer resident
    other_mb: float = 0.0  # the counted bytes `base` already holds (embeddings, head)
    peak_mb: float = 0.0  # peak RSS of a profiled training step (0: not profiled)
    counted_mb: float = 0.0  # that step's counted footprint

    def budget_mb(self, margin: float = 0.1) -> float | None:
        """The counted training footprint this device can afford with `margin` of its limit kept
        free (None when not measured)."""
        if not self.limit_mb or not self.peak_mb or self.counted_mb <= self.other_mb:
            return None
        growth = max((self.peak_mb - self.base_mb) / (self.counted_mb - self.other_mb), 1.0)
        return max(self.other_mb + (self.limit_mb * (1 - margin) - self.base_mb) / growth, 0.0)


def discrete_gpu(device: torch.device) -> bool:
    """A CUDA device with memory of its own (not a Jetson's, which shares the host's RAM)."""
    return device.type == "cuda" and not torch.cuda.get_device_properties(device).is_integrated


def join_memory(device: torch.device) -> MemoryMeasure:
    """What training on `device` may use and uses now: a discrete GPU's memory (what other
    processes leave free, and what torch already holds), else the process's (host RAM, which a
    Jetson's GPU shares)."""
    if discrete_gpu(device):
        free, _ = torch.cuda.mem_get_info(device)
        return MemoryMeasure((free + torch.cuda.memory_reserved(device)) / MIB,
                             torch.cuda.memory_allocated(device) / MIB)
    return MemoryMeasure(memory_limit_mb(), rss_mb())


def reset_peak(device: torch.device) -> None:
    """A new peak window of the memory training on `device` uses (see `join_memory`)."""
    if discrete_gpu(device):
        reset_peak_cuda(device)
    else:
        reset_peak_rss()


def peak_mb(device: torch.device) -> float:
    """The peak since `reset_peak` of the memory training on `device` uses (see `join_memory`)."""
    return peak_cuda_mb(device) if discrete_gpu(device) else peak_rss_mb()
