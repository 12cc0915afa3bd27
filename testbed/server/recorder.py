"""A run's record: config.yaml, metrics.jsonl (a row per round), each device's totals, the
failures, and summary.json at the end."""
from __future__ import annotations

import collections
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from testbed.comm.transport import Failure
from testbed.core.config import ExperimentConfig, save_config
from testbed.core.devices import CLASSES
from testbed.core.files import atomic_write
from testbed.core.plan import Plan, Update
from testbed.server.experiment import Experiment


@dataclass
class DeviceTotals:
    """One device's totals over the rounds it took part in (summary.json's `devices`)."""

    device_class: str
    rounds: int = 0
    peak_train_mem_mb: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    energy_j: float = 0.0  # modelled: its class's power over the rounds it took part in
    measured_energy_j: float | None = None  # what its host's power sensors counted (None: none)

    def as_dict(self) -> dict:
        """As summary.json and the checkpoint hold it (`class` for the device class)."""
        fields = dataclasses.asdict(self)
        return {"class": fields.pop("device_class"), **fields}

    @classmethod
    def from_dict(cls, d: dict) -> DeviceTotals:
        fields = dict(d)
        return cls(device_class=fields.pop("class"), **fields)


@dataclass
class Record:
    """What a run has recorded so far (a checkpoint carries it)."""

    rows: list[dict] = field(default_factory=list)  # metrics.jsonl
    totals: dict[str, DeviceTotals] = field(default_factory=dict)  # by device name
    failures: list[dict] = field(default_factory=list)  # testbed.comm.transport.Failure as dicts


@dataclass
class RoundTimes:
    """A round's times, as its row records them."""

    clock_s: float  # the run's clock after the round (modelled or wall)
    wall_s: float  # wall seconds of the run so far
    train_wall_s: float  # this round's: the transport's round trip
    eval_wall_s: float  # this round's: evaluating the global model
    device_s: dict[str, float]  # this round's, per device, on the modelled clock
    round_s: float  # this round's length on the run's clock


# Task causal_lm's figures, in a row where evaluated (round 0's row: the untuned model's too).
LANGUAGE_MODEL_METRICS = ("perplexity", "zero_shot_accuracy", "zero_shot_loss")


class RunRecorder:
    """Writes a run's files as its rounds end, and keeps their record."""

    def __init__(self, out: Path, exp: Experiment, resumed: Record | None = None):
        """A fresh record, or one resumed from a checkpoint's: a row written after that checkpoint
        is dropped, since its round will run again."""
        self.out = out
        self.exp = exp
        self.record = resumed or Record()
        if resumed:
            self.note_restart()
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").unlink(missing_ok=True)  # a summary is of a finished run; this one is not, yet
        save_config(exp.cfg, out / "config.yaml")
        atomic_write(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.record.rows).encode())

    def note_restart(self) -> None:
        """A run resumed after it was stopped (not one extended after it finished) records the
        restart among its failures, with the rounds logged after the checkpoint that run again."""
        done = len(self.record.rows)  # rounds 0 .. done - 1, each with its row
        summary = self.out / "summary.json"
        if summary.is_file() and json.loads(summary.read_text())["rounds"] == done:
            return
        metrics = self.out / "metrics.jsonl"
        logged = metrics.read_text().count("\n") if metrics.is_file() else 0
        redone = max(0, logged - done)
        self.record.failures.append({"round": done, "device": "aggregator", "kind": "restart",
                                     "detail": f"stopped with {done} rounds done; resumed from its checkpoint "
                                               f"({redone} later round(s) in the log run again)"})

    def round(self, r: int, plans: dict[str, Plan], updates: list[Update], failures: list[Failure],
              metrics: dict, times: RoundTimes) -> dict:
        """Record a round: its row (appended to metrics.jsonl), the devices' totals, its failures."""
        per_device = [self.device_row(plans[u.device], u, times) for u in updates]
        self.record.failures += [dataclasses.asdict(f) for f in failures]
        row = {"round": r, "clock": self.exp.cfg.clock, "clock_s": times.clock_s, "wall_s": times.wall_s,
               "train_wall_s": times.train_wall_s, "eval_wall_s": times.eval_wall_s,
               "accuracy": metrics.get("accuracy"), "test_loss": metrics.get("loss"),
               **{k: metrics[k] for k in LANGUAGE_MODEL_METRICS if k in metrics},
               "loss": sum(u.loss * u.samples for u in updates) / max(sum(u.samples for u in updates), 1),
               "bytes_up": sum(u.report.bytes_up for u in updates),
               "bytes_down": sum(u.report.bytes_down for u in updates),
               "energy_j": sum(d["energy_j"] for d in per_device),
               "personal_accuracy": personal_accuracy(per_device, updates),
               "devices": per_device, "failures": [f.device for f in failures]}
        self.record.rows.append(row)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def device_row(self, plan: Plan, u: Update, times: RoundTimes) -> dict:
        """A device's entry in the round's row; its totals count it."""
        device_class = self.exp.devices[u.device].device_class
        rec = {"device": u.device, "class": device_class, "clock_s": times.device_s[u.device],
               "wall_s": u.report.compute_s,
               "loss": u.loss, **plan_summary(plan, self.exp.info.num_layers),
               "peak_train_mem_mb": round(u.report.peak_train_mem_mb, 3),
               "peak_rss_mb": round(u.report.peak_rss_mb, 1), "peak_cuda_mb": round(u.report.peak_cuda_mb, 1),
               "bytes_up": u.report.bytes_up, "bytes_down": u.report.bytes_down,
               "energy_j": self.energy_j(plan, u.device, times.round_s),
               "measured_energy_j": u.report.measured_energy_j}
        if u.report.peak_cuda_reserved_mb is not None:
            rec["peak_cuda_reserved_mb"] = round(u.report.peak_cuda_reserved_mb, 1)
        if plan.validate:
            rec["personal_accuracy"] = u.report.val_accuracy
        total = self.record.totals.setdefault(u.device, DeviceTotals(device_class))
        total.rounds += 1
        total.peak_train_mem_mb = max(total.peak_train_mem_mb, rec["peak_train_mem_mb"])
        total.peak_rss_mb = max(total.peak_rss_mb, u.report.peak_rss_mb)
        total.peak_cuda_mb = max(total.peak_cuda_mb, u.report.peak_cuda_mb)
        total.bytes_up += u.report.bytes_up
        total.bytes_down += u.report.bytes_down
        total.energy_j += rec["energy_j"]
        if u.report.measured_energy_j is not None:
            total.measured_energy_j = (total.measured_energy_j or 0.0) + u.report.measured_energy_j
        return rec

    def energy_j(self, plan: Plan, device: str, round_s: float) -> float:
        """A device's modelled energy in a round: its class's busy power for the seconds the cost
        model gives its work (training, probe, validation), idle power for the rest of the round
        (its transfers and its wait for the slowest device)."""
        d = self.exp.devices[device]
        busy_s = self.exp.cost.busy_seconds(d, plan)
        return CLASSES[d.device_class].energy_j(busy_s, round_s)

    def summary(self) -> dict:
        """The run's summary, written to summary.json."""
        summary = summarise(self.record, self.exp.cfg)
        atomic_write(self.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary


def plan_summary(plan: Plan, num_layers: int) -> dict:
    """What a device was asked to do, in three numbers: LoRA layers trained, their ranks summed,
    and the mean probability that a resident layer is skipped in a step (and the cap on the
    layers a step runs, where there is one)."""
    trained, running = plan.trained(num_layers), plan.running(num_layers)
    summary = {"layers": len(trained), "rank_sum": sum(plan.ranks[l] for l in trained),
               "drop": round(sum(1 - p for p in running.values()) / max(len(running), 1), 4)}
    return summary | ({"max_active": plan.max_active} if plan.max_active else {})


def personal_accuracy(per_device: list[dict], updates: list[Update]) -> float | None:
    """Each device's own model on its own validation split, weighted by its samples."""
    pairs = [(d["personal_accuracy"], u.samples) for d, u in zip(per_device, updates) if "personal_accuracy" in d]
    return sum(a * n for a, n in pairs) / sum(n for _, n in pairs) if pairs else None


def summarise(record: Record, cfg: ExperimentConfig) -> dict:
    rows, devices = record.rows, [t.as_dict() for t in record.totals.values()]
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    hit = next((r for r in evaluated if r["accuracy"] >= cfg.target_accuracy), None)
    measured = [d["measured_energy_j"] for d in devices if d["measured_energy_j"] is not None]
    return {
        "method": cfg.strategy.name,
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
        "peak_train_mem_mb": max((d["peak_train_mem_mb"] for d in devices), default=0.0),
        "peak_rss_mb": max((d["peak_rss_mb"] for d in devices), default=0.0),
        "energy_j": sum(d["energy_j"] for d in devices),
        "measured_energy_j": sum(measured) if measured else None,
        "devices": {name: t.as_dict() for name, t in record.totals.items()},
        "failures": record.failures,
        **language_model_summary(rows),
    }


def language_model_summary(rows: list[dict]) -> dict:
    """Task causal_lm: the untuned model's accuracy and the last perplexity ({} for classification)."""
    if not rows or "zero_shot_loss" not in rows[0]:
        return {}
    return {"zero_shot_accuracy": rows[0]["zero_shot_accuracy"],
            "final_perplexity": next((r["perplexity"] for r in reversed(rows) if "perplexity" in r), None)}


def data_label(cfg: ExperimentConfig) -> str:
    d = cfg.data
    if d.source == "synthetic":
        return f"synthetic topics ({d.synthetic_classes} classes, generated)"
    if d.source == "hub":
        name = f"{d.hub_name}/{d.hub_config}" if d.hub_config else d.hub_name
    else:
        name = Path(d.train_file).name
    return f"{name} ({d.partition}{f', alpha={d.alpha:g}' if d.partition == 'dirichlet' else ''})"


def table(summary: dict) -> str:
    def fmt(key: str, v) -> str:
        if v is None:  # only the time to target, never reached, or an accuracy never evaluated
            return "not reached" if key == "time_to_target_s" else "n/a"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    keys = ["method", "data", "rounds", "final_accuracy", "best_accuracy", "target_accuracy", "time_to_target_s",
            "clock", "clock_s", "wall_s", "bytes_up", "bytes_down", "peak_train_mem_mb", "peak_rss_mb", "energy_j"]
    width = max(map(len, keys))
    lines = [f"{k:<{width}}  {fmt(k, summary[k])}" for k in keys]
    kinds = collections.Counter(f["kind"] for f in summary["failures"])
    lines.append(f"{'failures':<{width}}  {sum(kinds.values())}"
                 + (f" ({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))})" if kinds else ""))
    return "\n".join(lines)
