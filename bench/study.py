"""The methods' study shared by bench/legend.py, bench/droppeft.py and bench/fedpruner.py.

Runs examples/agnews-jetsons.yaml once per strategy (same seed, same data, modelled clock)
and compares each with `fedlora`: time and bytes to the target accuracy, final accuracy,
per-device peak memory and round-time spread.  Or (`from_study`) reads the same comparison,
per split and over seeds, from a `testbed compare` study that has already run the methods
(`make bench` runs examples/study-agnews.yaml first, so its benchmarks do not run them again).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "ag_news"

from testbed.core.config import load_config  # noqa: E402
from testbed.experiments.run import run_inprocess  # noqa: E402


def study_sets(quick: bool) -> list[str]:
    sets = [f"data.train_file={DATA / 'train.csv'}", f"data.test_file={DATA / 'test.csv'}"]
    if quick:
        sets += ["rounds=4", "model.max_length=32", "data.max_test=200", "train.local_steps=6",
                 "target_accuracy=0.4"]
    return sets


def run(name: str, sets: list[str], out: Path) -> dict:
    cfg = load_config(ROOT / "examples" / "agnews-jetsons.yaml", sets)
    start = time.perf_counter()
    summary = run_inprocess(cfg, out / name, quiet=True, force=True)  # replaces the last results
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    hit = summary["rounds_to_target"]
    bytes_to_target = sum(r["bytes_up"] + r["bytes_down"] for r in rows[:hit]) if hit else None
    spreads = [max(d["clock_s"] for d in r["devices"]) / min(d["clock_s"] for d in r["devices"]) for r in rows]
    result = {"final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
              "final_personal_accuracy": summary["final_personal_accuracy"],
              "time_to_target_s": summary["time_to_target_s"], "rounds_to_target": hit,
              "bytes_to_target": bytes_to_target, "clock_s": summary["clock_s"],
              "bytes_total": summary["bytes_up"] + summary["bytes_down"],
              "peak_train_mem_mb": {d: v["peak_train_mem_mb"] for d, v in summary["devices"].items()},
              "round_spread_max_over_min": round(sorted(spreads)[len(spreads) // 2], 3),
              "failures": len(summary["failures"]), "wall_s": round(time.perf_counter() - start, 1)}
    print(f"{name:<10} final {result['final_accuracy']:.4f}  target@ {result['time_to_target_s']} s "
          f"({hit} rounds)  bytes {result['bytes_to_target']}  ({result['wall_s']} s)", file=sys.stderr)
    return result


def by_class(result: dict) -> dict[str, float]:
    """The largest peak training memory among each class's devices (devices are named class-i)."""
    out: dict[str, float] = {}
    for device, mb in result["peak_train_mem_mb"].items():
        cls = device.rsplit("-", 1)[0]
        out[cls] = max(out.get(cls, 0.0), mb)
    return out


def compare(results: dict, baseline: str = "fedlora") -> dict:
    """Ratios against the baseline: speedup to target, traffic and memory reduction, accuracy gap."""
    base = results[baseline]
    out = {}
    for name, r in results.items():
        if name == baseline:
            continue
        both = r["time_to_target_s"] and base["time_to_target_s"]
        out[name] = {
            "speedup_to_target": round(base["time_to_target_s"] / r["time_to_target_s"], 3) if both else None,
            "bytes_to_target_reduction": round(1 - r["bytes_to_target"] / base["bytes_to_target"], 3) if both else None,
            "peak_mem_reduction": round(1 - max(r["peak_train_mem_mb"].values())
                                        / max(base["peak_train_mem_mb"].values()), 3),
            "mean_mem_reduction": round(1 - sum(r["peak_train_mem_mb"].values())
                                        / sum(base["peak_train_mem_mb"].values()), 3),
            "peak_mem_reduction_by_class": {c: round(1 - v / by_class(base)[c], 3) for c, v in by_class(r).items()},
            "final_accuracy_gap_points": round(100 * (r["final_accuracy"] - base["final_accuracy"]), 2),
            "final_personal_accuracy_gap_points": (
                round(100 * (r["final_personal_accuracy"] - base["final_personal_accuracy"]), 2)
                if r["final_personal_accuracy"] is not None and base["final_personal_accuracy"] is not None else None),
        }
    return out


def from_study(study: Path, names: list[str]) -> dict:
    """The study's figures for the methods `names`, per setting (split and device mix): its
    report.json groups (seeds, time to target, speed-up, final accuracy, memory, traffic)."""
    report = study / "report.json"
    if not report.is_file():
        sys.exit(f"no study report at {report}: run `testbed compare examples/study-agnews.yaml --out {study}` first")
    out: dict[str, dict] = {}
    for group in json.loads(report.read_text())["groups"]:
        if group["method"] in names:
            figures = {k: v for k, v in group.items() if k not in ("setting", "method", "runs")}
            out.setdefault(group["setting"], {})[group["method"]] = figures
    for setting, methods in out.items():
        if missing := sorted(set(names) - set(methods)):
            sys.exit(f"{report}: the study has no {', '.join(missing)} in setting {setting!r}")
    return out
