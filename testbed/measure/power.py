"""The energy the host's power sensors count: Intel RAPL counters, or a Jetson's INA3221 rails.

Both are read from sysfs under a root that tests may replace (`sys_root`, normally /sys):
- RAPL (`class/powercap/intel-rapl:N/energy_uj`, also on AMD Zen since Linux 5.11): cumulative
  microjoules per CPU package, wrapping at `max_energy_range_uj`.  Only the top-level zones are
  summed (their subzones, `intel-rapl:N:M`, are parts of them).  Often readable by root only.
- INA3221 (Jetson boards): instantaneous power per rail, sampled on a thread and integrated over
  time.  Two layouts: hwmon (`class/hwmon/hwmonN/name` = ina3221, `inK_input` mV, `currK_input`
  mA, `inK_label`; JetPack 5 and later) and the older IIO driver (`bus/i2c/drivers/ina3221x/*/
  iio:device*/in_powerK_input` mW, `rail_name_K`).  The rail VDD_IN is the module's input, so
  where a board has it, it alone is counted; elsewhere the rails are summed.

What a meter counts is the whole package's or board's energy, whatever else runs on it.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SYS = Path("/sys")
TOTAL_RAIL = "VDD_IN"
CHANNELS = (1, 2, 3)  # an INA3221's


class EnergyMeter(Protocol):
    def start(self) -> None: ...

    def stop(self) -> float:
        """Joules since `start`."""


def find_meter(sys_root: Path = SYS) -> EnergyMeter | None:
    """The host's energy meter: RAPL where readable, else INA3221 rails, else None."""
    if zones := rapl_zones(sys_root):
        return RaplMeter(zones)
    if rails := ina_rails(sys_root):
        return InaMeter(rails)
    return None


# -- RAPL ------------------------------------------------------------------------------------------

@dataclass
class RaplZone:
    energy: Path  # energy_uj: microjoules, counting up and wrapping at `max_uj`
    max_uj: int

    def read(self) -> int:
        return int(self.energy.read_text())


def rapl_zones(sys_root: Path = SYS) -> list[RaplZone]:
    """The readable top-level RAPL zones (one per CPU package)."""
    zones = []
    for d in sorted((sys_root / "class/powercap").glob("intel-rapl:*")):
        if not re.fullmatch(r"intel-rapl:\d+", d.name):
            continue
        try:
            zone = RaplZone(d / "energy_uj", int((d / "max_energy_range_uj").read_text()))
            zone.read()
        except (OSError, ValueError):  # energy_uj is root-only on most kernels since 2020
            continue
        zones.append(zone)
    return zones


def counter_delta(before: int, after: int, max_value: int) -> int:
    """What a counter that wraps at `max_value` counted from `before` to `after` (one wrap at most)."""
    return after - before if after >= before else after + max_value - before


class RaplMeter:
    def __init__(self, zones: list[RaplZone]):
        self.zones = zones
        self._start: list[int] = []

    def start(self) -> None:
        self._start = [z.read() for z in self.zones]

    def stop(self) -> float:
        return sum(counter_delta(b, z.read(), z.max_uj) for b, z in zip(self._start, self.zones)) / 1e6


# -- INA3221 ---------------------------------------------------------------------------------------

@dataclass
class Rail:
    name: str
    power: Path | None = None  # in_powerK_input, mW (IIO layout)
    voltage: Path | None = None  # inK_input, mV (hwmon layout)
    current: Path | None = None  # currK_input, mA (hwmon layout)

    def watts(self) -> float:
        if self.power is not None:
            return float(self.power.read_text()) / 1e3
        return float(self.voltage.read_text()) * float(self.current.read_text()) / 1e6


def ina_rails(sys_root: Path = SYS) -> list[Rail]:
    """The rails to count: VDD_IN alone where a board has it, else every readable rail."""
    rails = [r for r in _hwmon_rails(sys_root) + _iio_rails(sys_root) if _readable(r)]
    total = [r for r in rails if r.name == TOTAL_RAIL]
    return total[:1] or rails


def _hwmon_rails(sys_root: Path) -> list[Rail]:
    rails = []
    for d in sorted((sys_root / "class/hwmon").glob("hwmon*")):
        if _text(d / "name") != "ina3221":
            continue
        for k in CHANNELS:  # in4.. are shunt voltages, curr4 the sum of the currents: not rails
            volts, amps = d / f"in{k}_input", d / f"curr{k}_input"
            if volts.is_file() and amps.is_file():
                rails.append(Rail(_text(d / f"in{k}_label") or f"{d.name}/in{k}", voltage=volts, current=amps))
    return rails


def _iio_rails(sys_root: Path) -> list[Rail]:
    rails = []
    for d in sorted((sys_root / "bus/i2c/drivers/ina3221x").glob("*/iio:device*")):
        for power in sorted(d.glob("in_power*_input")):
            k = power.name[len("in_power"):-len("_input")]
            rails.append(Rail(_text(d / f"rail_name_{k}") or f"{d.name}/power{k}", power=power))
    return rails


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _readable(rail: Rail) -> bool:
    try:
        rail.watts()
    except (OSError, ValueError):
        return False
    return True


def integrate(samples: list[tuple[float, float]]) -> float:
    """Joules from (seconds, watts) samples, by the trapezoidal rule."""
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(samples, samples[1:]))


class InaMeter:
    """Samples the rails' power on a thread every `interval_s` between `start` and `stop`."""

    def __init__(self, rails: list[Rail], interval_s: float = 0.05):
        self.rails = rails
        self.interval_s = interval_s
        self._samples: list[tuple[float, float]] = []
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            watts = sum(r.watts() for r in self.rails)
        except (OSError, ValueError):  # a read that failed: the trapezoid spans the gap
            return
        self._samples.append((time.monotonic(), watts))

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        self._samples, self._done = [], threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="ina3221", daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        self._sample()
        return integrate(self._samples)
