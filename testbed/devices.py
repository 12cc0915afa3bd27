"""Device classes: compute speed, memory budget and link bandwidth relative to a reference.

The reference is the machine the default profile was measured on (a 2-core x86-64
server CPU).  Speeds of the edge classes are ratios of published peak throughput,
scaled to the reference; a lab replaces them with `testbed profile` measurements of
its own devices.  Memory is the budget left to the training process, not the board's
total (the OS, the CUDA context and other tenants take the rest).
"""
from __future__ import annotations

from dataclasses import dataclass

from testbed.config import DeviceSpec
from testbed.errors import TestbedError


@dataclass(frozen=True)
class DeviceClass:
    name: str
    speed: float  # training throughput relative to the reference (higher is faster)
    memory_mb: float  # training memory budget
    bandwidth_mbit: float  # link to the aggregator
    latency_ms: float


CLASSES = {c.name: c for c in [
    # This machine kind: 2 cores of an x86-64 server CPU, AVX2 (measured, see bench/costmodel.py).
    DeviceClass("reference", 1.0, 4096, 1000, 0.2),
    # Laptop class: 4-core mobile x86 CPU, about 2x the reference's 2 cores in FP32 GEMM.
    DeviceClass("laptop", 2.0, 4096, 200, 5.0),
    # Jetson TX2: 256-core Pascal GPU, 1.33 TFLOPS FP16 peak, 8 GB shared LPDDR4
    # (NVIDIA Jetson TX2 module data sheet).  About 2x the reference in practice.
    DeviceClass("jetson-tx2", 2.0, 1536, 20, 20.0),
    # Jetson Orin Nano 8GB: 1024-core Ampere GPU, 40 TOPS (sparse INT8), ~10 TFLOPS FP16
    # (Jetson Orin Nano series data sheet).
    DeviceClass("orin-nano", 5.0, 3072, 50, 10.0),
    # Jetson Xavier NX: 384-core Volta GPU + 48 tensor cores, 21 TOPS INT8, ~6 TFLOPS FP16
    # (Jetson Xavier NX data sheet).
    DeviceClass("xavier-nx", 4.0, 3072, 50, 10.0),
    # Jetson AGX Orin 32GB: 1792-core Ampere GPU, 200 TOPS (sparse INT8), ~27 TFLOPS FP16
    # (Jetson AGX Orin series data sheet).
    DeviceClass("agx-orin", 14.0, 12288, 200, 5.0),
]}


@dataclass
class Device:
    """One device of a run (in-process or real): its class and effective limits."""

    name: str
    device_class: str
    speed: float
    memory_mb: float
    bandwidth_mbit: float
    latency_ms: float


def devices_from_config(mix: dict[str, DeviceSpec], source: str = "devices") -> list[Device]:
    out = []
    for cls_name, spec in mix.items():
        if cls_name not in CLASSES:
            raise TestbedError(f"{source}: unknown device class {cls_name!r} (known: {', '.join(CLASSES)})")
        c = CLASSES[cls_name]
        for i in range(spec.count):
            out.append(Device(f"{cls_name}-{i}", cls_name, spec.speed or c.speed,
                              spec.memory_mb or c.memory_mb, c.bandwidth_mbit, c.latency_ms))
    if not out:
        raise TestbedError(f"{source}: no devices")
    return out
