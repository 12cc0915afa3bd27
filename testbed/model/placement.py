"""Where and in what precision a model runs: its device (`model.device`), autocast
(`train.precision`), and the dtype its frozen base is held in (`model.dtype`).

LoRA factors, the head and the optimizer's state stay float32 whatever the precision (peft keeps
adapters float32 beside a half-precision base), and so does everything that leaves the device:
the global state, aggregation and the wire live on the CPU.  A device copies the LoRA and head
its plan needs onto itself once at the start of a round (`moved`), every pass of the round (the
probe, both validations, training) loads them from there, and the round's result is copied back
to the CPU once at its end.
"""
from __future__ import annotations

import contextlib
import re
import time
import warnings
from dataclasses import dataclass, field

import torch

from testbed.core.errors import TestbedError
from testbed.core.plan import HeadState, LoraState

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def resolve_device(name: str, key: str = "model.device") -> torch.device:
    """`model.device` as a torch device: auto is CUDA where this process sees a CUDA device, else the CPU."""
    if not DEVICE.fullmatch(name):
        raise TestbedError(f"{key}: {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TestbedError(f"{key}: {name}, but this process sees no CUDA device "
                           f"(torch {torch.__version__}; a CPU build, or no driver)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TestbedError(f"{key}: {name}, but this process sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TestbedError(f"{key}: {name}, but this machine has no MPS device")
    return device


def describe(device: torch.device) -> str:
    """The device and, for CUDA, the GPU's name and compute capability (for errors and the hello)."""
    if device.type != "cuda":
        return str(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"


def check_precision(device: torch.device, precision: str, key: str = "train.precision") -> None:
    """A TestbedError naming the device where torch cannot autocast to `precision` on it."""
    if precision == "fp32":
        return
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise TestbedError(f"{key}: bf16 is not supported on {describe(device)}; use fp16 or fp32")
    with warnings.catch_warnings(record=True) as caught:  # torch warns, and disables autocast, where it cannot
        warnings.simplefilter("always")
        try:
            with torch.autocast(device.type, dtype=PRECISIONS[precision]):
                out = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        except RuntimeError as exc:
            raise TestbedError(f"{key}: {precision} autocast fails on {describe(device)}: "
                               f"{str(exc).splitlines()[0]}") from None
    if out.dtype != PRECISIONS[precision]:
        why = f": {caught[0].message}" if caught else ""
        raise TestbedError(f"{key}: torch does not autocast to {precision} on {describe(device)}{why}")


@dataclass(frozen=True)
class Placement:
    """The device a backbone lives on and the precision its forward passes run in."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward passes in the run's precision (nothing changes at fp32)."""
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision], enabled=self.precision != "fp32")

    def scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, which fp16's narrow range needs (disabled, a pass-through, otherwise)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def clock(self) -> float:
        """Seconds (perf_counter) once the work queued on the device is done: a GPU runs its
        kernels after the call that queued them returns."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter()

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch on this device."""
        return {k: v.to(self.device) for k, v in batch.items()}


def place(model: torch.nn.Module, head: dict[str, torch.nn.Parameter], device: torch.device,
          dtype: torch.dtype) -> None:
    """Move the model to `device` and hold its frozen base's floating-point tensors in `dtype`; the
    head (trained) stays float32.  Layers not yet read (on the meta device) only take the dtype:
    `hold` reads them onto the device later."""
    for module in model.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            moved = t.to(device=t.device if t.is_meta else device, dtype=dtype if t.is_floating_point() else None)
            if isinstance(t, torch.nn.Parameter):
                t.data = moved
            else:
                setattr(module, name, moved)
    for p in head.values():
        p.data = p.data.float()


def model_placement(device: str, precision: str, keys: tuple[str, str] = ("model.device", "train.precision")
                    ) -> Placement:
    """A device and a precision checked on this machine; `keys` name them in errors."""
    resolved = resolve_device(device, keys[0])
    check_precision(resolved, precision, keys[1])
    return Placement(resolved, precision)


def moved(lora: LoraState, head: HeadState, device: torch.device) -> tuple[LoraState, HeadState]:
    """LoRA factors and a head on `device` (tensors already there are not copied)."""
    return ({l: {n: t.to(device) for n, t in ts.items()} for l, ts in lora.items()},
            {n: t.to(device) for n, t in head.items()})
