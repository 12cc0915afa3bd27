"""Finished runs as the report reads them, grouped by setting and method."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from testbed.core.config import ExperimentConfig, load_config, to_dict
from testbed.core.errors import TestbedError

SPLIT_AND_MIX = ("seed", "data.partition", "data.alpha")  # shown by split_label / mix_label


@dataclass
class Run:
    path: Path
    cfg: ExperimentConfig
    rows: list[dict]
    summary: dict


@dataclass
class Group:
    """The seeds of one method in one setting, and what the report says about them."""

    setting: str
    method: str
    runs: list[Run]
    stats: dict = field(default_factory=dict)


# Finding and reading runs.

def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories: each path is one (it holds config.yaml) or is searched for them."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise TestbedError(f"{p}: not a directory")
        dirs = [p] if (p / "config.yaml").is_file() else sorted(c.parent for c in p.rglob("config.yaml"))
        if not dirs:
            raise TestbedError(f"{p}: no run directories (config.yaml) in it")
        found += [d for d in dirs if d not in found]
    return found


def load_run(path: Path) -> Run:
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise TestbedError(f"{path}: no summary.json: the run has not finished (testbed run --resume completes it)")
    try:
        summary = json.loads(summary_path.read_text())
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError) as exc:
        raise TestbedError(f"{path}: unreadable run output: {exc}") from None
    return Run(path, load_config(path / "config.yaml"), rows, summary)


def read_rows(path: Path) -> list[dict]:
    """The rows a run directory holds so far: none before its first round is logged."""
    metrics = path / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


# What the process measured, not what the run computed.
MEASURED = ("wall_s", "peak_rss_mb", "peak_cuda_mb", "peak_cuda_reserved_mb", "measured_energy_j")


def strip_wall(obj):
    """Rows or a summary without the keys of what the process measured (wall time, peak memory):
    what two runs of one config on the modelled clock agree on, byte for byte."""
    if isinstance(obj, dict):
        return {k: strip_wall(v) for k, v in obj.items() if not k.endswith(MEASURED)}
    if isinstance(obj, list):
        return [strip_wall(v) for v in obj]
    return obj


# Labels.

def method_label(cfg: ExperimentConfig) -> str:
    """The strategy's name and every option that differs from that strategy's default."""
    opts, defaults = to_dict(cfg.strategy), to_dict(type(cfg.strategy)())
    changed = [f"{k}={_short(v)}" for k, v in opts.items() if k != "name" and v != defaults[k]]
    return " ".join([cfg.strategy.name, *changed])


def split_label(cfg: ExperimentConfig) -> str:
    d = cfg.data
    return f"dirichlet({d.alpha:g})" if d.partition == "dirichlet" else d.partition


def mix_label(cfg: ExperimentConfig) -> str:
    parts = []
    for cls, spec in cfg.devices.items():
        limits = [f"{spec.memory_mb:g} MiB" if spec.memory_mb else "", f"speed {spec.speed:g}" if spec.speed else ""]
        extra = ", ".join(x for x in limits if x)
        parts.append(f"{spec.count} {cls}" + (f" ({extra})" if extra else ""))
    return ", ".join(parts)


def _short(v: object) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def group_runs(runs: list[Run]) -> list[Group]:
    """Group by (setting, method), in order of first appearance."""
    flats = [{k: v for k, v in _flat(to_dict(r.cfg)).items()
              if k not in SPLIT_AND_MIX and not k.startswith(("strategy.", "devices."))} for r in runs]
    varying = sorted(k for k in set().union(*flats) if len({_short(f.get(k)) for f in flats}) > 1)
    groups: dict[tuple[str, str], Group] = {}
    for run, flat in zip(runs, flats):
        setting = "; ".join([f"split {split_label(run.cfg)}", f"devices {mix_label(run.cfg)}",
                             *(f"{k}={_short(flat.get(k))}" for k in varying)])
        key = (setting, method_label(run.cfg))
        groups.setdefault(key, Group(setting, key[1], [])).runs.append(run)
    return list(groups.values())
