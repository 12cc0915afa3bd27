"""Energy: the device classes' power model, and the host's power sensors read from sysfs trees
built in a temporary directory (the real readers, given another root)."""
import time
from pathlib import Path

import pytest

from testbed.core.devices import CLASSES
from testbed.measure.power import (InaMeter, RaplMeter, counter_delta,
                                   find_meter, ina_rails, integrate,
                                   rapl_zones)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def test_modelled_energy_is_busy_then_idle():
    tx2 = CLASSES["jetson-tx2"]  # 15 W busy, 7.5 W idle
    assert tx2.energy_j(busy_s=10.0, span_s=30.0) == 15.0 * 10 + 7.5 * 20
    assert tx2.energy_j(busy_s=0.0, span_s=4.0) == 30.0
    assert tx2.energy_j(busy_s=12.0, span_s=10.0) == 15.0 * 12  # busy past the span: no idle
    for c in CLASSES.values():
        assert 0 < c.idle_w < c.busy_w


def test_counter_delta_wraps():
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(900, 50, 1000) == 150  # wrapped at 1000


def rapl_tree(root: Path, package_uj: int, core_uj: int = 5) -> Path:
    zone = root / "class/powercap/intel-rapl:0"
    write(zone / "max_energy_range_uj", "262143328850")
    write(zone / "energy_uj", str(package_uj))
    write(root / "class/powercap/intel-rapl:0:0/energy_uj", str(core_uj))  # a subzone: part of the package
    write(root / "class/powercap/intel-rapl:0:0/max_energy_range_uj", "262143328850")
    return zone / "energy_uj"


def test_rapl_meter_counts_packages_only_and_wraps(tmp_path):
    energy = rapl_tree(tmp_path, 262143328850 - 1_000_000)
    zones = rapl_zones(tmp_path)
    assert [z.energy for z in zones] == [energy]
    meter = find_meter(tmp_path)
    assert isinstance(meter, RaplMeter)
    meter.start()
    energy.write_text("2500000\n")  # wrapped: 1 J before the wrap and 2.5 J after
    assert meter.stop() == pytest.approx(3.5)


def test_unreadable_rapl_is_no_meter(tmp_path):
    write(tmp_path / "class/powercap/intel-rapl:0/max_energy_range_uj", "1000")  # energy_uj missing (root-only)
    assert rapl_zones(tmp_path) == [] and find_meter(tmp_path) is None


def test_integrate_trapezoids():
    assert integrate([(0.0, 10.0), (1.0, 20.0), (3.0, 20.0)]) == 15.0 + 40.0
    assert integrate([(5.0, 7.0)]) == 0.0


def hwmon_tree(root: Path, rails: dict[str, tuple[int, int]]) -> None:
    d = root / "class/hwmon/hwmon1"
    write(d / "name", "ina3221")
    for k, (label, (mv, ma)) in enumerate(rails.items(), 1):
        write(d / f"in{k}_label", label)
        write(d / f"in{k}_input", str(mv))
        write(d / f"curr{k}_input", str(ma))
    write(d / "in4_input", "12")  # a shunt voltage and the sum of the currents: not rails
    write(d / "curr4_input", "3000")
    write(root / "class/hwmon/hwmon0/name", "cpu_thermal")


def test_hwmon_rails_prefer_the_module_input(tmp_path):
    hwmon_tree(tmp_path, {"VDD_IN": (5000, 1000), "VDD_CPU_GPU_CV": (5000, 400), "VDD_SOC": (5000, 300)})
    rails = ina_rails(tmp_path)
    assert [r.name for r in rails] == ["VDD_IN"] and rails[0].watts() == 5.0


def test_hwmon_rails_summed_without_a_module_input(tmp_path):
    hwmon_tree(tmp_path, {"VDD_GPU_SOC": (5000, 800), "VDD_CPU_CV": (5000, 400)})
    assert sum(r.watts() for r in ina_rails(tmp_path)) == pytest.approx(6.0)


def test_ina_meter_integrates_sampled_power(tmp_path):
    """The older IIO layout (TX2, Xavier): power in mW per rail, sampled on a thread."""
    d = tmp_path / "bus/i2c/drivers/ina3221x/0-0040/iio:device0"
    write(d / "rail_name_0", "VDD_IN")
    write(d / "in_power0_input", "4000")
    write(d / "rail_name_1", "VDD_SYS_GPU")
    write(d / "in_power1_input", "1500")
    meter = find_meter(tmp_path)
    assert isinstance(meter, InaMeter) and [r.name for r in meter.rails] == ["VDD_IN"]
    meter.interval_s = 0.01
    power = d / "in_power0_input"
    t0 = time.monotonic()
    meter.start()
    time.sleep(0.1)
    t1 = time.monotonic()
    power.write_text("8000\n")  # a burst the start and stop samples alone would not see
    time.sleep(0.1)
    t2 = time.monotonic()
    power.write_text("4000\n")
    time.sleep(0.1)
    joules = meter.stop()
    t3 = time.monotonic()
    assert joules == pytest.approx(4 * (t1 - t0) + 8 * (t2 - t1) + 4 * (t3 - t2), rel=0.15)
    assert joules > 4 * (t3 - t0) + 0.2


def test_this_host():
    """The real sysfs: a meter where the files exist, and it counts something non-negative."""
    meter = find_meter()
    if meter is None:
        pytest.skip("this host exposes no readable RAPL or INA3221 files")
    meter.start()
    time.sleep(0.1)
    assert meter.stop() >= 0.0
