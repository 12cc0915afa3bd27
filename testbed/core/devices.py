"""Device classes: compute speed, memory budget and link relative to a measured reference.

The reference is the machine the shipped profile was measured on
(inventory/profiles/minilm-reference.yaml: 2 vCPUs of an AMD EPYC server), where MiniLM
LoRA training runs at about 106 GFLOP/s (REFERENCE_GFLOPS in testbed/server/costmodel.py).

The edge classes are *derived*, not measured: speed = published FP32 peak of the board's GPU
x an assumed 30 % utilisation for small-batch LoRA training / 106 GFLOP/s.  Memory is the
budget left to the training process after the OS, the CUDA context and other tenants on the
board's shared DRAM (an assumption), and links are typical edge Wi-Fi figures (assumptions).
A lab replaces all of these with `testbed profile` measurements of its own boards; agents
measure their link when they join.
"""
from __future__ import annotations

from dataclasses import dataclass

from testbed.core.config import DeviceSpec, did_you_mean
from testbed.core.errors import TestbedError


@dataclass(frozen=True)
class DeviceClass:
    name: str
    speed: float  # training throughput relative to the reference (higher is faster)
    memory_mb: float  # training memory budget
    bandwidth_mbit: float  # link to the aggregator
    latency_ms: float


CLASSES = {c.name: c for c in [
    # The reference itself (measured): 2 vCPUs, AVX-512, 2 torch threads.
    DeviceClass("reference", 1.0, 4096, 1000, 0.2),
    # A laptop: 4 cores of a mobile x86 CPU with AVX2, about twice the reference's cores at a
    # similar per-core vector width (assumed 2x).
    DeviceClass("laptop", 2.0, 4096, 200, 5.0),
    # Jetson TX2: 256 Pascal CUDA cores x 2 FLOP x 1.30 GHz = 0.67 TFLOPS FP32; 8 GB LPDDR4
    # shared with the CPU (NVIDIA Jetson TX2 module data sheet).  0.67e3 x 0.3 / 106 = 1.9.
    DeviceClass("jetson-tx2", 1.9, 1536, 20, 20.0),
    # Jetson Orin Nano 8GB: 1024 Ampere CUDA cores x 2 x 0.625 GHz = 1.28 TFLOPS FP32; 8 GB
    # LPDDR5 shared (Jetson Orin Nano series data sheet).  1.28e3 x 0.3 / 106 = 3.6.
    DeviceClass("orin-nano", 3.6, 3072, 50, 10.0),
    # Jetson Xavier NX: 384 Volta CUDA cores x 2 x 1.1 GHz = 0.85 TFLOPS FP32; 8 GB LPDDR4x
    # shared (Jetson Xavier NX data sheet).  0.85e3 x 0.3 / 106 = 2.4.
    DeviceClass("xavier-nx", 2.4, 3072, 50, 10.0),
    # Jetson AGX Orin 32GB: 1792 Ampere CUDA cores x 2 x 0.93 GHz = 3.33 TFLOPS FP32; 32 GB
    # LPDDR5 shared (Jetson AGX Orin series data sheet).  3.33e3 x 0.3 / 106 = 9.4.
    DeviceClass("agx-orin", 9.4, 12288, 200, 5.0),
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
    """`{class: spec}` gives `count` devices named class-0, class-1, ...; a spec with a
    `device_class` is one device named by its key (deployments name devices after hosts)."""
    out = []
    for key, spec in mix.items():
        cls_name = spec.device_class or key
        if cls_name not in CLASSES:
            raise TestbedError(f"{source}: unknown device class {cls_name!r}{did_you_mean(cls_name, CLASSES)} "
                               f"(known: {', '.join(CLASSES)})")
        if spec.device_class and spec.count != 1:
            raise TestbedError(f"{source}.{key}: a device named by its key (device_class set) has count 1")
        c = CLASSES[cls_name]
        names = [key] if spec.device_class else [f"{key}-{i}" for i in range(spec.count)]
        for name in names:
            out.append(Device(name, cls_name, spec.speed or c.speed, spec.memory_mb or c.memory_mb,
                              c.bandwidth_mbit, c.latency_ms))
    if not out:
        raise TestbedError(f"{source}: no devices")
    names = [d.name for d in out]
    if dup := next((n for n in names if names.count(n) > 1), None):
        raise TestbedError(f"{source}: two devices are named {dup!r}")
    return out
