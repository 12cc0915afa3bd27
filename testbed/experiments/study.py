"""`testbed compare`: a matrix of runs, strategies x seeds x device mixes x data splits.

A study file names a base experiment config and the axes to vary.  Each cell of the matrix is
one ordinary in-process run in its own directory, `<strategy>/<split>/<mix>/seed<N>` under the
study's `out`, so a study can be stopped at any point and started again: a finished cell is
skipped, a killed one resumed from its last checkpoint (a cell killed before its first round
starts afresh).  Every cell's config is validated before the first one runs.
"""
from __future__ import annotations

import copy
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.core.config import (ExperimentConfig, apply_override,
                                 did_you_mean, difference_but_rounds,
                                 from_dict, load_config, read_mapping,
                                 set_dotted)
from testbed.core.devices import devices_from_config
from testbed.core.errors import TestbedError
from testbed.experiments.report import seconds, slug
from testbed.experiments.runs import method_label

KEYS = ("base", "out", "baseline", "target_accuracy", "strategies", "seeds", "devices", "splits", "set")
NAME = re.compile(r"[A-Za-z0-9._+=-]+")  # mix and split names become directory names


@dataclass
class Cell:
    strategy: str  # the strategy entry's directory name
    split: str
    mix: str
    seed: int
    cfg: ExperimentConfig

    @property
    def name(self) -> str:
        return f"{self.strategy}/{self.split}/{self.mix}/seed{self.seed}"


@dataclass
class Study:
    path: Path
    out: Path
    baseline: str
    cells: list[Cell]


def load_study(path: str | Path, overrides: list[str] = (), out: str | None = None) -> Study:
    """Read and validate a study file; `overrides` (`--set K=V`) apply to every cell."""
    path = Path(path)
    raw = read_mapping(path, "study")
    for key in raw:
        if key not in KEYS:
            raise TestbedError(f"{path}: {key}: unknown key{did_you_mean(str(key), KEYS)} "
                               f"(known: {', '.join(KEYS)})")
    base = _common(raw, path, overrides)
    strategies = _strategies(raw, base, path)
    mixes = {name: {"devices": mix} for name, mix in _named(raw, "devices", path).items()}
    splits = {name: {"data": {**(base.get("data") or {}), **split}} for name, split in _named(raw, "splits", path).items()}
    for axis, entries in [("devices", mixes), ("splits", splits)]:
        for name, part in entries.items():
            _validate({**base, **part}, f"{path}: {axis}.{name}")
    mixes = mixes or {"base": {}}  # an axis left out: the base config's own setting, named `base`
    splits = splits or {"base": {}}
    seeds = _seeds(raw, path, from_dict(base).seed)
    cells = [Cell(s_name, split, mix, seed, from_dict({**base, **splits[split], **mixes[mix], "seed": seed,
                                                       "strategy": entry}, f"{path} ({s_name}/{split}/{mix})"))
             for s_name, entry in strategies.items() for split in splits for mix in mixes for seed in seeds]
    return Study(path, _out(raw, path, out), _baseline(raw, path, cells), cells)


def _common(raw: dict, path: Path, overrides: list[str]) -> dict:
    """What every cell shares: the base config, the study's `set` and target, then `--set`."""
    base = _base(raw, path)
    for key, value in _mapping(raw, "set", path, {}).items():
        set_dotted(base, str(key), copy.deepcopy(value), f"set.{key}", path)
    _validate(base, f"{path}: set")
    if "target_accuracy" in raw:
        base["target_accuracy"] = raw["target_accuracy"]
        _validate(base, str(path))
    for item in overrides:
        apply_override(base, item, path)
    _validate(base, f"{path} with --set")
    return base


def _baseline(raw: dict, path: Path, cells: list[Cell]) -> str:
    baseline = raw.get("baseline", "fedlora")
    labels = {method_label(c.cfg) for c in cells}
    if baseline not in labels:
        raise TestbedError(f"{path}: baseline: {baseline!r} is not one of the study's strategies "
                           f"({', '.join(sorted(labels))})")
    return baseline


def _out(raw: dict, path: Path, out: str | None) -> Path:
    where = out or raw.get("out") or f"runs/{path.stem}"
    if not isinstance(where, str):
        raise TestbedError(f"{path}: out: expected a directory path, got {where!r}")
    return Path(where)


def _base(raw: dict, path: Path) -> dict:
    """The base config as a raw mapping: a file (relative to the study file) or inline."""
    base = raw.get("base")
    if isinstance(base, str):
        base_path = path.parent / base
        if not base_path.is_file():
            raise TestbedError(f"{path}: base: {base_path} not found (relative to the study file)")
        mapping = read_mapping(base_path, "config")
        _validate(mapping, str(base_path))
        return mapping
    if isinstance(base, dict):
        _validate(base, f"{path}: base")
        return copy.deepcopy(base)
    raise TestbedError(f"{path}: base: expected a config file path or an inline config mapping, got {base!r}")


def _validate(raw: dict, source: str) -> ExperimentConfig:
    cfg = from_dict(copy.deepcopy(raw), source)
    devices_from_config(cfg.devices, f"{source}: devices", cfg.train.precision)  # classes are checked only here
    return cfg


def _mapping(raw: dict, key: str, path: Path, default: dict | None) -> dict:
    value = raw.get(key, default)
    if not isinstance(value, dict):
        raise TestbedError(f"{path}: {key}: expected a mapping, got {value!r}")
    return value


def _named(raw: dict, key: str, path: Path) -> dict[str, dict]:
    """An axis of named settings (empty if the study leaves it out)."""
    if key not in raw:
        return {}
    entries = _mapping(raw, key, path, None)
    if not entries:
        raise TestbedError(f"{path}: {key}: expected at least one named entry")
    for name, value in entries.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise TestbedError(f"{path}: {key}: {name!r} is not a usable name (letters, digits, . _ + = -)")
        if not isinstance(value, dict):
            raise TestbedError(f"{path}: {key}.{name}: expected a mapping, got {value!r}")
    return entries


def _strategies(raw: dict, base: dict, path: Path) -> dict[str, dict]:
    """Strategy entries by directory name: a name, or a mapping with `name` and options."""
    entries = raw.get("strategies")
    if not isinstance(entries, list) or not entries:
        raise TestbedError(f"{path}: strategies: expected a non-empty list of strategy names or "
                           f"mappings with a name and options, got {entries!r}")
    out: dict[str, dict] = {}
    for i, entry in enumerate(entries):
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise TestbedError(f"{path}: strategies[{i}]: expected a strategy name or a mapping with `name`")
        cfg = _validate({**base, "strategy": entry}, f"{path}: strategies[{i}]")
        name = slug(method_label(cfg))
        if name in out:
            raise TestbedError(f"{path}: strategies[{i}]: {method_label(cfg)!r} is already in the study")
        out[name] = entry
    return out


def _seeds(raw: dict, path: Path, default: int) -> list[int]:
    seeds = raw.get("seeds", [default])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise TestbedError(f"{path}: seeds: expected a non-empty list of distinct integers, got {seeds!r}")
    return seeds


# Running.

def cell_status(out: Path, cfg: ExperimentConfig) -> str:
    """`done` (finished at the cell's rounds), `resume` (a checkpoint to continue from) or `new`."""
    if not (out / "config.yaml").is_file():
        return "new"
    if key := difference_but_rounds(cfg, load_config(out / "config.yaml")):
        raise TestbedError(f"{out}: holds a run whose {key} differs from the study's cell: "
                           f"delete it or use another --out")
    rounds = _finished_rounds(out)
    if rounds is not None and rounds > cfg.rounds:
        raise TestbedError(f"{out}: ran {rounds} rounds, more than the study's {cfg.rounds}: "
                           f"delete it or use another --out")
    if rounds == cfg.rounds:
        return "done"
    return "resume" if (out / "checkpoint.pt").is_file() else "new"


def _finished_rounds(out: Path) -> int | None:
    try:
        return json.loads((out / "summary.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_study(study: Study, log=sys.stderr) -> list[Path]:
    """Run every cell not yet finished, one after another; return all cells' run directories."""
    from testbed.experiments.run import \
        run_inprocess  # torch and the model code load only when cells run

    status = {c.name: cell_status(study.out / c.name, c.cfg) for c in study.cells}
    left = [c for c in study.cells if status[c.name] != "done"]
    print(f"testbed: study {study.path}: {len(study.cells)} cells in {study.out}: "
          f"{len(study.cells) - len(left)} finished, {len(left)} to run", file=log)
    spent: list[float] = []
    for i, cell in enumerate(study.cells, 1):
        prefix = f"testbed: [{i}/{len(study.cells)}] {cell.name}:"
        if status[cell.name] == "done":
            continue
        start = time.perf_counter()
        # force: a `new` cell's directory holds at most a start of this very cell (cell_status checked it)
        summary = run_inprocess(cell.cfg, study.out / cell.name, quiet=True, resume=status[cell.name] == "resume",
                                force=True)
        spent.append(time.perf_counter() - start)
        remaining = len(left) - len(spent)
        ttt = summary["time_to_target_s"]
        print(f"{prefix} {'resumed, ' if status[cell.name] == 'resume' else ''}final accuracy "
              f"{summary['final_accuracy']:.4f}, target {summary['target_accuracy']:g} "
              f"{'not reached' if ttt is None else f'at {seconds(ttt)} s ({cell.cfg.clock})'}; took {spent[-1]:.0f} s; "
              f"{remaining} left, ETA {_duration(statistics.fmean(spent) * remaining)}", file=log)
    return [study.out / c.name for c in study.cells]


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
