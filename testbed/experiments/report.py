"""Reports over finished runs: `report.md`, `report.json` and PNG plots.

Runs are grouped by what they ran: the *setting* (data split, device mix and any other config
key that varies between the runs) and the *method* (strategy name plus the options that differ
from its defaults); the seeds of a group are aggregated (mean, sample std).  Each method is
compared with the baseline method of its setting.  A run that never reached its target has no
time to target: it is counted as not reached and left out of the mean and the ratios, never
shown as 0.
"""
from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

from testbed.core.devices import CLASSES
from testbed.core.files import atomic_write
from testbed.experiments.plots import plot_setting
from testbed.experiments.runs import Group, Run, group_runs, load_run
from testbed.measure.memory import MIB


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9._=+,-]+", "-", re.sub(r"[][{}\"']", "", text)).strip("-")


# Figures.

def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None  # no spread of one


def bytes_to_target(run: Run) -> int | None:
    hit = run.summary["rounds_to_target"]
    return sum(r["bytes_up"] + r["bytes_down"] for r in run.rows[:hit]) if hit else None


def energy_to_target(run: Run) -> float | None:
    """Modelled joules of every device up to the round that reached the target (None: not reached, or
    a run recorded before energy was)."""
    hit = run.summary["rounds_to_target"]
    return sum(r["energy_j"] for r in run.rows[:hit]) if hit and "energy_j" in run.summary else None


def class_peaks(run: Run) -> dict[str, float]:
    """Per device class, the largest counted training footprint of its devices (MiB)."""
    peaks: dict[str, float] = {}
    for d in run.summary["devices"].values():
        peaks[d["class"]] = max(peaks.get(d["class"], 0.0), d["peak_train_mem_mb"])
    return peaks


def group_stats(g: Group, out: Path) -> dict:
    """The group's figures; its run directories relative to `out`, where the report goes."""
    runs = g.runs
    times = [r.summary["time_to_target_s"] for r in runs if r.summary["time_to_target_s"] is not None]
    to_target = [b for r in runs if (b := bytes_to_target(r)) is not None]
    energy_to = [e for r in runs if (e := energy_to_target(r)) is not None]
    energy = [r.summary["energy_j"] for r in runs if "energy_j" in r.summary]
    measured = [m for r in runs if (m := r.summary.get("measured_energy_j")) is not None]
    classes = sorted({c for r in runs for c in class_peaks(r)}, key=list(CLASSES).index)
    ttt_mean, ttt_std = _mean_std(times)
    final_mean, final_std = _mean_std([r.summary["final_accuracy"] for r in runs])
    return {
        "setting": g.setting, "method": g.method, "runs": [os.path.relpath(r.path, out) for r in runs],
        "seeds": [r.cfg.seed for r in runs], "clock": runs[0].cfg.clock,
        "target_accuracy": runs[0].cfg.target_accuracy,
        "reached": len(times), "time_to_target_s": ttt_mean, "time_to_target_std": ttt_std,
        "final_accuracy": final_mean, "final_accuracy_std": final_std,
        "best_accuracy": statistics.fmean(r.summary["best_accuracy"] for r in runs),
        # A class none of whose devices finished a round (all out of memory, say) has no figure.
        "peak_train_mem_mb_by_class": {c: statistics.fmean(p[c] for r in runs if c in (p := class_peaks(r)))
                                       for c in classes},
        "mean_device_peak_train_mem_mb": statistics.fmean(
            statistics.fmean(d["peak_train_mem_mb"] for d in r.summary["devices"].values()) for r in runs),
        "peak_rss_mb": max(r.summary["peak_rss_mb"] for r in runs),
        "bytes_up_per_round": statistics.fmean(r.summary["bytes_up"] / r.summary["rounds"] for r in runs),
        "bytes_down_per_round": statistics.fmean(r.summary["bytes_down"] / r.summary["rounds"] for r in runs),
        "bytes_to_target": statistics.fmean(to_target) if to_target else None,
        "energy_j": _mean_std(energy)[0],
        "energy_to_target_j": _mean_std(energy_to)[0],
        "measured_energy_j": _mean_std(measured)[0],
        "failures": sum(len(r.summary["failures"]) for r in runs),
    }


def versus(s: dict, base: dict | None) -> dict:
    """Ratios against the baseline of the same setting (None where either side has no figure)."""
    if base is None:
        return dict.fromkeys(["speedup", "memory_reduction", "traffic_reduction", "per_round_traffic_reduction",
                              "energy_reduction"])
    both = s["time_to_target_s"] and base["time_to_target_s"]
    per_round = s["bytes_up_per_round"] + s["bytes_down_per_round"]
    base_round = base["bytes_up_per_round"] + base["bytes_down_per_round"]
    return {
        "speedup": base["time_to_target_s"] / s["time_to_target_s"] if both else None,
        "memory_reduction": 1 - s["mean_device_peak_train_mem_mb"] / base["mean_device_peak_train_mem_mb"],
        "traffic_reduction": 1 - s["bytes_to_target"] / base["bytes_to_target"]
        if s["bytes_to_target"] and base["bytes_to_target"] else None,
        "per_round_traffic_reduction": 1 - per_round / base_round,
        "energy_reduction": 1 - s["energy_to_target_j"] / base["energy_to_target_j"]
        if s["energy_to_target_j"] and base["energy_to_target_j"] else None,
    }


# The report.

def write_report(run_dirs: list[Path], out: Path, baseline: str = "fedlora", title: str = "Report") -> Path:
    """Read the runs, write report.md, report.json and the plots into `out`; return report.md's path."""
    runs = [load_run(p) for p in run_dirs]
    groups = group_runs(runs)
    for g in groups:
        g.stats = group_stats(g, out)
    settings = list(dict.fromkeys(g.setting for g in groups))
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", _preamble(runs, groups, baseline)]
    for i, setting in enumerate(settings, 1):
        in_setting = [g for g in groups if g.setting == setting]
        in_setting.sort(key=lambda g: g.method != baseline)  # baseline first, else order of appearance
        base = next((g.stats for g in in_setting if g.method == baseline), None)
        for g in in_setting:
            g.stats["vs_baseline"] = versus(g.stats, base)
        images = plot_setting(in_setting, baseline, out, f"{i}-")
        lines += [f"## {i}. {setting}", "", *_tables(in_setting, baseline, base is not None), "",
                  *(f"![{name}]({name})" for name in images), ""]
    lines += _notes(baseline)
    path = out / "report.md"
    atomic_write(path, "\n".join(lines).encode())
    atomic_write(out / "report.json", (json.dumps({"baseline": baseline, "groups": [g.stats for g in groups]},
                                                  indent=1) + "\n").encode())
    return path


def _preamble(runs: list[Run], groups: list[Group], baseline: str) -> str:
    clocks = sorted({r.cfg.clock for r in runs})
    data = sorted({r.summary["data"] for r in runs})
    return (f"{len(runs)} runs in {len(groups)} groups (method x setting; seeds aggregated). "
            f"Data: {'; '.join(data)}. Clock: {', '.join(clocks)}. Baseline: `{baseline}`.\n")


def _pm(mean: float | None, std: float | None, fmt: str = "") -> str:
    if mean is None:
        return "n/a"
    show = (lambda x: f"{x:{fmt}}") if fmt else seconds
    return show(mean) if std is None else f"{show(mean)} ± {show(std)}"


def seconds(x: float) -> str:
    """Three significant digits, never in exponent form (a run's clock may be 0.4 s or 4000 s)."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _tables(groups: list[Group], baseline: str, has_base: bool) -> list[str]:
    first = groups[0].stats
    target, clock = first["target_accuracy"], first["clock"]
    head = ["method", "seeds", "reached target", f"time to {target:g} ({clock} s)", f"speed-up vs {baseline}",
            "final accuracy", "best accuracy", "memory reduction", "MiB to target", "traffic reduction"]
    rows = []
    for g in groups:
        s, v = g.stats, g.stats["vs_baseline"]
        n = len(s["seeds"])
        time = "not reached" if not s["reached"] else _pm(s["time_to_target_s"], s["time_to_target_std"])
        rows.append([f"`{g.method}`", str(n), f"{s['reached']}/{n}", time,
                     "n/a" if v["speedup"] is None else f"{v['speedup']:.2f}x",
                     _pm(s["final_accuracy"], s["final_accuracy_std"], ".4f"), f"{s['best_accuracy']:.4f}",
                     _reduction(v["memory_reduction"]), "n/a" if s["bytes_to_target"] is None
                     else f"{s['bytes_to_target'] / MIB:.1f}", _reduction(v["traffic_reduction"])])
    classes = sorted({c for g in groups for c in g.stats["peak_train_mem_mb_by_class"]}, key=list(CLASSES).index)
    head2 = ["method", *(f"{c} footprint (MiB)" for c in classes), "process peak RSS (MiB)",
             "MiB up / round", "MiB down / round", "per-round traffic reduction", "energy (kJ)",
             "energy to target (kJ)", "energy reduction", "measured energy (kJ)", "failures"]
    rows2 = [[f"`{g.method}`", *(_footprint(g.stats["peak_train_mem_mb_by_class"], c) for c in classes),
              f"{g.stats['peak_rss_mb']:.0f}", f"{g.stats['bytes_up_per_round'] / MIB:.2f}",
              f"{g.stats['bytes_down_per_round'] / MIB:.2f}",
              _reduction(g.stats["vs_baseline"]["per_round_traffic_reduction"]), _kilo(g.stats["energy_j"]),
              _kilo(g.stats["energy_to_target_j"]), _reduction(g.stats["vs_baseline"]["energy_reduction"]),
              _kilo(g.stats["measured_energy_j"]), str(g.stats["failures"])]
             for g in groups]
    missing = [] if has_base else ["", f"No `{baseline}` runs in this setting: no ratios."]
    return [*_md_table(head, rows), "", *_md_table(head2, rows2), *missing]


def _footprint(peaks: dict[str, float], device_class: str) -> str:
    return f"{peaks[device_class]:.1f}" if device_class in peaks else "none finished"


def _reduction(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _kilo(joules: float | None) -> str:
    return "n/a" if joules is None else f"{joules / 1e3:.2f}"


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _notes(baseline: str) -> list[str]:
    return ["## How to read this", "",
            "- *Time to target*: the clock time (run's clock) at the first evaluation at or above the target "
            "accuracy; mean ± sample std over the seeds that reached it. Seeds that never reached it count in "
            "*reached target* and are left out of the mean and of every ratio.",
            f"- *Speed-up vs {baseline}*: mean time to target of `{baseline}` / this method's (over the seeds "
            "that reached it); above 1 is faster.",
            "- *Memory*: the counted training footprint (resident parameters + LoRA gradients + optimizer "
            "state + bytes autograd saved for backward; a device-side probe's where larger), per device. The "
            "per-class columns are the largest footprint of that class's devices (mean over the seeds where "
            "one finished a round; *none finished*: every round of every such device failed, out of memory "
            "say); *memory reduction* compares the mean over the devices that finished a round of each "
            "device's peak with the baseline's. *Process peak RSS* is the real resident set "
            "of the process that ran the devices: in-process runs share one process, and the cells of a "
            "`testbed compare` study run one after another in one process, so it is an upper bound, not a "
            "per-device figure.",
            "- *Traffic*: LoRA and head bytes on the wire, all devices, up and down. *MiB to target* sums the "
            "rounds up to the one that reached the target; *traffic reduction* compares it with the "
            "baseline's; the per-round figure compares mean bytes per round.",
            "- *Energy*: modelled, every device over the whole run: its class's busy power while it trains, "
            "probes or validates (the cost model's seconds) and its idle power for the rest of each round it "
            "takes part in (transfers and waiting for the slowest device); *energy to target* sums the rounds up "
            "to the one that reached the target, and *energy reduction* compares it with the baseline's. "
            "*Measured energy* is what the hosts' power sensors (RAPL, INA3221) counted, where they have them: "
            "in-process runs count the one host's package or board.",
            "- Accuracy plot: mean over seeds (line) and ± one std (band), on the common clock range of the "
            "seeds.", ""]
