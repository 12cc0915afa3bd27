"""Run outputs: config.yaml, metrics.jsonl (a row per round), summary.json, checkpoint."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from testbed.core.config import ExperimentConfig, save_config
from testbed.core.errors import TestbedError
from testbed.core.files import atomic_write


def load_checkpoint(out: Path) -> dict:
    path = out / "checkpoint.pt"
    if not path.is_file():
        raise TestbedError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, weights_only=False)  # our own file: rows, RNG and strategy states
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise TestbedError(f"{path}: unreadable checkpoint: {str(exc).splitlines()[0]}") from None


class RunLog:
    def __init__(self, out: Path, cfg: ExperimentConfig, rows: list[dict] | None = None):
        """A fresh log, or (`rows` from a checkpoint) one resumed after those rows: a row
        written after the last checkpoint is dropped, since its round will run again."""
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        self.rows: list[dict] = list(rows or [])
        atomic_write(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def row(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint(self, payload: dict) -> None:
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")

    def summary(self, summary: dict) -> None:
        atomic_write(self.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())


def summarise(rows: list[dict], method: str, cfg: ExperimentConfig, devices: dict[str, dict],
              failures: list[dict]) -> dict:
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    hit = next((r for r in evaluated if r["accuracy"] >= cfg.target_accuracy), None)
    return {
        "method": method,
        "data": data_label(cfg),
        "rounds": len(rows),
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "final_personal_accuracy": next((r["personal_accuracy"] for r in reversed(rows)
                                         if r.get("personal_accuracy") is not None), None),
        "target_accuracy": cfg.target_accuracy,
        "time_to_target_s": hit["clock_s"] if hit else None,
        "rounds_to_target": hit["round"] + 1 if hit else None,
        "clock": cfg.clock,
        "clock_s": rows[-1]["clock_s"] if rows else 0.0,
        "wall_s": rows[-1]["wall_s"] if rows else 0.0,
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "peak_train_mem_mb": max((d["peak_train_mem_mb"] for d in devices.values()), default=0.0),
        "peak_rss_mb": max((d["peak_rss_mb"] for d in devices.values()), default=0.0),
        "devices": devices,
        "failures": failures,
    }


def data_label(cfg: ExperimentConfig) -> str:
    d = cfg.data
    if d.source == "synthetic":
        return f"synthetic topics ({d.synthetic_classes} classes, generated)"
    name = d.hub_name if d.source == "hub" else Path(d.train_file).name
    return f"{name} ({d.partition}{f', alpha={d.alpha:g}' if d.partition == 'dirichlet' else ''})"


def table(summary: dict) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    keys = ["method", "data", "rounds", "final_accuracy", "best_accuracy", "target_accuracy", "time_to_target_s",
            "clock", "clock_s", "wall_s", "bytes_up", "bytes_down", "peak_train_mem_mb", "peak_rss_mb"]
    width = max(map(len, keys))
    lines = [f"{k:<{width}}  {fmt(summary[k])}" for k in keys]
    lines.append(f"{'failures':<{width}}  {len(summary['failures'])}")
    return "\n".join(lines)
