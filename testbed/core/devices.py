"""Device classes: compute speed, memory budget and link relative to a measured reference.

The reference is the machine the shipped profile was measured on
(inventory/profiles/minilm-reference.yaml: 2 vCPUs of an AMD EPYC server), where MiniLM
LoRA training runs at about 106 GFLOP/s (REFERENCE_GFLOPS in testbed/server/costmodel.py).

The edge classes are *derived*, not measured: speed = published FP32 peak of the board's GPU
x an assumed 30 % utilisation for small-batch LoRA training / 106 GFLOP/s.  Memory is the
budget left to the training process after the OS, the CUDA context and other tenants on the
board's shared DRAM (an assumption), and links are typical edge Wi-Fi figures (assumptions).
Power is the whole board's (module's) draw, idle and under a training load, from the boards' power
modes and data sheets (assumptions, stated per class); it gives the modelled `energy_j` of a run.
A lab replaces all of these with `testbed profile` measurements of its own boards; agents
measure their link when they join.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from testbed.core.config import DeviceSpec, did_you_mean
from testbed.core.errors import TestbedError


@dataclass(frozen=True)
class DeviceClass:
    name: str
    speed: float  # training throughput relative to the reference (higher is faster)
    memory_mb: float  # training memory budget
    bandwidth_mbit: float  # link to the aggregator
    latency_ms: float
    idle_w: float  # the device's draw while it waits or transfers (its radio's draw is counted in idle)
    busy_w: float  # its draw while it trains, validates or probes
    # How many times faster than fp32 a step runs under each half precision (train.precision) the
    # class supports; a precision missing here is one it lacks.
    half: dict[str, float] = field(default_factory=dict)

    def energy_j(self, busy_s: float, span_s: float) -> float:
        """Joules over `span_s` seconds of which `busy_s` compute, idle for the rest (a span
        shorter than the work, as on the wall clock, charges the work in full and no idle)."""
        return self.busy_w * busy_s + self.idle_w * max(span_s - busy_s, 0.0)


# Half-precision speedups.  The reference's are measured (MiniLM LoRA steps, `testbed profile
# --precision`, 2 threads, quiet, medians of 2: bf16 1.96x, fp16 0.046x: its CPU has bf16
# instructions, and fp16 is emulated).  The others are assumptions from the chips' data sheets, discounted because a
# small-batch LoRA step is not all matrix products: Pascal (TX2) has fp16 at twice its FP32 rate
# and no bf16 (1.5x); Volta (Xavier NX) has fp16 tensor cores and no bf16 (2x); Ampere (Orin)
# has both (2x); a laptop's AVX2 CPU has neither natively (bf16 1x, fp16 as the reference's).
CLASSES = {c.name: c for c in [
    # The reference itself (measured): 2 vCPUs, AVX-512, 2 torch threads.  Power: its share of a
    # two-socket server that draws about 200 W idle and 500 W busy over 128 vCPUs: 3 / 8 W.
    DeviceClass("reference", 1.0, 4096, 1000, 0.2, idle_w=3.0, busy_w=8.0, half={"bf16": 2.0, "fp16": 0.05}),
    # A laptop: 4 cores of a mobile x86 CPU with AVX2, about twice the reference's cores at a
    # similar per-core vector width (assumed 2x).  Power: about 5 W idle with the screen off, and a
    # 28 W mobile CPU's sustained package power plus the rest of the machine busy: 5 / 30 W.
    DeviceClass("laptop", 2.0, 4096, 200, 5.0, idle_w=5.0, busy_w=30.0, half={"bf16": 1.0, "fp16": 0.05}),
    # Jetson TX2: 256 Pascal CUDA cores x 2 FLOP x 1.30 GHz = 0.67 TFLOPS FP32; 8 GB LPDDR4
    # shared with the CPU (NVIDIA Jetson TX2 module data sheet).  0.67e3 x 0.3 / 106 = 1.9.
    # Power: its 7.5 W (Max-Q) and 15 W (Max-P) modes taken as idle and busy.
    DeviceClass("jetson-tx2", 1.9, 1536, 20, 20.0, idle_w=7.5, busy_w=15.0, half={"fp16": 1.5}),
    # Jetson Orin Nano 8GB: 1024 Ampere CUDA cores x 2 x 0.625 GHz = 1.28 TFLOPS FP32; 8 GB
    # LPDDR5 shared (Jetson Orin Nano series data sheet).  1.28e3 x 0.3 / 106 = 3.6.
    # Power: its 7 W and 15 W modes taken as idle and busy.
    DeviceClass("orin-nano", 3.6, 3072, 50, 10.0, idle_w=7.0, busy_w=15.0, half={"bf16": 2.0, "fp16": 2.0}),
    # Jetson Xavier NX: 384 Volta CUDA cores x 2 x 1.1 GHz = 0.85 TFLOPS FP32; 8 GB LPDDR4x
    # shared (Jetson Xavier NX data sheet).  0.85e3 x 0.3 / 106 = 2.4.
    # Power: its 10 W and 20 W modes taken as idle and busy.
    DeviceClass("xavier-nx", 2.4, 3072, 50, 10.0, idle_w=10.0, busy_w=20.0, half={"fp16": 2.0}),
    # Jetson AGX Orin 32GB: 1792 Ampere CUDA cores x 2 x 0.93 GHz = 3.33 TFLOPS FP32; 32 GB
    # LPDDR5 shared (Jetson AGX Orin series data sheet).  3.33e3 x 0.3 / 106 = 9.4.
    # Power: 15 W (its lowest mode) idle, 60 W (MAXN) busy.
    DeviceClass("agx-orin", 9.4, 12288, 200, 5.0, idle_w=15.0, busy_w=60.0, half={"bf16": 2.0, "fp16": 2.0}),
]}


def precision_speedup(device_class: str, precision: str) -> float:
    """How many times faster than fp32 a class computes in `precision` (fp32, bf16, fp16)."""
    if precision == "fp32":
        return 1.0
    half = CLASSES[device_class].half
    if precision not in half:
        raise TestbedError(f"{device_class} has no {precision} (it has {', '.join(['fp32', *half])}): "
                           "see train.precision")
    return half[precision]


@dataclass
class Device:
    """One device of a run (in-process or real): its class and effective limits."""

    name: str
    device_class: str
    speed: float
    memory_mb: float
    bandwidth_mbit: float
    latency_ms: float
    profile: str = ""  # a profile measured on it, which set-up reads its speed and link from
    val_rows: int = 0  # its validation split's rows: a plan that validates runs them twice a round


def devices_from_config(mix: dict[str, DeviceSpec], source: str = "devices", precision: str = "fp32") -> list[Device]:
    """`{class: spec}` gives `count` devices named class-0, class-1, ...; a spec with a
    `device_class` is one device named by its key (deployments name devices after hosts).  A
    class the cost model cannot time in `precision` (train.precision) is refused, save for a
    device described by its own profile."""
    out = []
    for key, spec in mix.items():
        cls_name = spec.device_class or key
        if cls_name not in CLASSES:
            raise TestbedError(f"{source}: unknown device class {cls_name!r}{did_you_mean(cls_name, CLASSES)} "
                               f"(known: {', '.join(CLASSES)})")
        if spec.device_class and spec.count != 1:
            raise TestbedError(f"{source}.{key}: a device named by its key (device_class set) has count 1")
        if spec.speed and spec.profile:
            raise TestbedError(f"{source}.{key}: speed and profile both set; a profile gives the speed")
        if spec.profile and not Path(spec.profile).is_file():
            raise TestbedError(f"{source}.{key}.profile: {spec.profile} not found")
        if not spec.profile:
            try:
                precision_speedup(cls_name, precision)
            except TestbedError as exc:
                raise TestbedError(f"{source}.{key}: {exc}") from None
        c = CLASSES[cls_name]
        names = [key] if spec.device_class else [f"{key}-{i}" for i in range(spec.count)]
        for name in names:
            out.append(Device(name, cls_name, spec.speed or c.speed, spec.memory_mb or c.memory_mb,
                              c.bandwidth_mbit, c.latency_ms, spec.profile))
    if not out:
        raise TestbedError(f"{source}: no devices")
    names = [d.name for d in out]
    if dup := next((n for n in names if names.count(n) > 1), None):
        raise TestbedError(f"{source}: two devices are named {dup!r}")
    return out
