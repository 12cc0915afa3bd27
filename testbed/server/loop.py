"""The aggregator's round loop (DESIGN section 4), the same for every transport.

It owns the global state: each round it asks the strategy for plans, has the transport run them,
admits the updates, takes the strategy's new state and evaluates it."""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from testbed.comm.transport import Transport
from testbed.core.plan import Job, LayerProbe, Plan
from testbed.core.state import GlobalState
from testbed.measure.evaluate import evaluate
from testbed.measure.probe import probe_layers
from testbed.model.lora import get_head, init_lora
from testbed.server.admission import admit
from testbed.server.experiment import Experiment
from testbed.server.recorder import RunLog, load_checkpoint, summarise, table
from testbed.server.strategies import STRATEGIES
from testbed.server.strategies.base import Context, Strategy


def make_strategy(exp: Experiment) -> Strategy:
    samples = {d: len(s.train) for d, s in exp.data.shards.items()}
    ctx = Context(exp.cfg, exp.info, exp.devices, samples, exp.cost, functools.partial(server_probe, exp))
    return STRATEGIES[exp.cfg.strategy.name](ctx)


def initial_state(exp: Experiment, strategy: Strategy) -> GlobalState:
    """Every layer's LoRA at the strategy's maximum rank, and the model's head."""
    layers = list(range(exp.info.num_layers))
    return GlobalState(init_lora(exp.info, layers, strategy.max_rank(exp.cfg), exp.cfg.seed), get_head(exp.bb))


def server_probe(exp: Experiment, state: GlobalState, rows: int, blocks: bool) -> LayerProbe:
    """Probe the global model (by layer, or by block) on a proxy batch: a fixed, seeded sample
    of the training rows (standing in for the public data a real server would hold)."""
    idx = random.Random(exp.cfg.seed).sample(range(len(exp.data.train)), min(rows, len(exp.data.train)))
    return probe_layers(exp.bb, state.lora, state.head, exp.data.train.take(sorted(idx)), exp.cfg.model.lora,
                        blocks)


SPEED_EMA = 0.5  # weight of the previous estimate in the moving average of device speeds


class RoundLoop:
    def __init__(self, exp: Experiment, transport: Transport, out: Path, quiet: bool = False,
                 resume: bool = False):
        self.exp = exp
        self.cfg = exp.cfg
        self.transport = transport
        self.strategy = make_strategy(exp)
        self.state = initial_state(exp, self.strategy)
        self.quiet = quiet
        self.first_round = 0
        self.clock_s = 0.0
        self.wall_s = 0.0
        self.devices: dict[str, dict] = {}
        self.failures: list[dict] = []
        checkpoint = load_checkpoint(out) if resume else None
        if checkpoint:  # before the log rewrites the run directory: a refused resume leaves it as it was
            self.restore(checkpoint)
            self.note_restart(out, checkpoint)
        self.log = RunLog(out, exp.cfg, checkpoint["rows"] if checkpoint else None)

    def checkpoint(self, r: int) -> None:
        """Everything the next round depends on, so that a resumed run continues exactly."""
        self.log.checkpoint({
            "round": r, "lora": self.state.lora, "head": self.state.head, "strategy": self.strategy.state_dict(),
            "clock_s": self.clock_s, "wall_s": self.wall_s, "rows": self.log.rows, "devices": self.devices,
            "failures": self.failures, "transport": self.transport.state_dict(),
            "device_state": {n: dataclasses.asdict(d) for n, d in self.exp.devices.items()},
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}})

    def restore(self, c: dict) -> None:
        self.first_round = c["round"] + 1
        self.state = GlobalState(c["lora"], c["head"])
        self.strategy.load_state_dict(c["strategy"])
        self.clock_s, self.wall_s, self.devices, self.failures = c["clock_s"], c["wall_s"], c["devices"], c["failures"]
        self.transport.load_state_dict(c["transport"])
        for name, fields in c["device_state"].items():  # speeds refreshed online on the wall clock
            for key, value in fields.items():
                setattr(self.exp.devices[name], key, value)
        random.setstate(c["rng"]["python"])
        torch.set_rng_state(c["rng"]["torch"])
        print(f"testbed: resuming after round {c['round']} of {self.cfg.rounds}", file=sys.stderr)

    def note_restart(self, out: Path, c: dict) -> None:
        """A run resumed after it was stopped (not one extended after it finished) records the
        restart among its failures, with the rounds logged after the checkpoint that run again."""
        summary = out / "summary.json"
        if summary.is_file() and json.loads(summary.read_text())["rounds"] == c["round"] + 1:
            return
        logged = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").is_file() else 0
        redone = max(0, logged - len(c["rows"]))
        self.failures.append({"round": c["round"] + 1, "device": "aggregator", "kind": "restart",
                              "detail": f"stopped after round {c['round']}; resumed from its checkpoint "
                                        f"({redone} later round(s) in the log run again)"})

    def run(self) -> dict:
        desc = f"{self.cfg.strategy.name}" + (" [synthetic data]" if self.exp.data.synthetic else "")
        bar = tqdm(range(self.first_round, self.cfg.rounds), desc=desc, unit="round", initial=self.first_round,
                   total=self.cfg.rounds, disable=self.quiet, file=sys.stderr, dynamic_ncols=True)
        for r in bar:
            row = self.round(r)
            if row.get("accuracy") is not None:
                bar.set_postfix(acc=f"{row['accuracy']:.3f}", clock=f"{row['clock_s']:.0f}s")
        summary = summarise(self.log.rows, self.cfg.strategy.name, self.cfg, self.devices, self.failures)
        self.log.summary(summary)
        if not self.quiet:
            print(table(summary))
        return summary

    def round(self, r: int) -> dict:
        start = time.perf_counter()
        state, strategy = self.state, self.strategy
        plans = strategy.plan(r, self.transport.available(list(self.exp.devices)), state)
        jobs = {d: Job(p, state.downlink(p, self.exp.info.num_layers), state.head) for d, p in plans.items()}
        sent = time.perf_counter()
        result = self.transport.run_round(r, jobs)
        train_wall = time.perf_counter() - sent
        updates = admit(r, plans, result, self.exp.info, state.head,
                        {d: len(s.train) for d, s in self.exp.data.shards.items()})
        self.state = strategy.aggregate(r, updates, result.failures, state)
        self.failures += [dataclasses.asdict(f) for f in result.failures]
        evaluated = time.perf_counter()
        metrics = self.evaluate(r)
        eval_wall = time.perf_counter() - evaluated
        strategy.observe(r, {u.device: u.report for u in updates}, metrics)
        if self.cfg.clock == "wall":
            self.refresh_speeds(plans, updates)
        per_device = [self.device_record(plans[u.device], u) for u in updates]
        self.clock_s += self.round_clock(per_device, time.perf_counter() - start)
        self.wall_s += time.perf_counter() - start
        row = {"round": r, "clock": self.cfg.clock, "clock_s": self.clock_s, "wall_s": self.wall_s,
               "train_wall_s": train_wall, "eval_wall_s": eval_wall,
               "accuracy": metrics.get("accuracy"), "test_loss": metrics.get("loss"),
               "loss": sum(u.loss * u.samples for u in updates) / max(sum(u.samples for u in updates), 1),
               "bytes_up": sum(u.report.bytes_up for u in updates),
               "bytes_down": sum(u.report.bytes_down for u in updates),
               "personal_accuracy": personal_accuracy(per_device, updates),
               "devices": per_device, "failures": [f.device for f in result.failures]}
        self.log.row(row)
        self.checkpoint(r)
        return row

    def refresh_speeds(self, plans: dict, updates: list) -> None:
        """Online profile refresh: each device's speed (relative to the reference profile) follows
        its measured step times, as a moving average, so strategies plan with recent figures.
        Only on the wall clock: the modelled clock's inputs must not depend on measurements."""
        for u in updates:
            device = self.exp.devices[u.device]
            predicted = self.exp.cost.step_seconds(device, plans[u.device]) * device.speed  # at speed 1
            if u.report.step_s > 0:
                device.speed = SPEED_EMA * device.speed + (1 - SPEED_EMA) * predicted / u.report.step_s

    def evaluate(self, r: int) -> dict:
        if (r + 1) % self.cfg.eval_every and r + 1 != self.cfg.rounds:
            return {}
        return evaluate(self.exp.bb, self.state.lora, self.state.head, self.exp.data.test, self.cfg.model.lora,
                        self.cfg.train.eval_batch_size)

    def device_record(self, plan, u) -> dict:
        device = self.exp.devices[u.device]
        rec = {"device": u.device, "class": device.device_class,
               "clock_s": self.exp.cost.round_seconds(device, plan), "wall_s": u.report.compute_s,
               "loss": u.loss, **plan_summary(plan, self.exp.info.num_layers),
               "peak_train_mem_mb": round(u.report.peak_train_mem_mb, 3),
               "peak_rss_mb": round(u.report.peak_rss_mb, 1), "peak_cuda_mb": round(u.report.peak_cuda_mb, 1),
               "bytes_up": u.report.bytes_up, "bytes_down": u.report.bytes_down}
        if plan.validate:
            rec["personal_accuracy"] = u.report.val_accuracy
        total = self.devices.setdefault(u.device, {"class": device.device_class, "rounds": 0,
                                                   "peak_train_mem_mb": 0.0, "peak_rss_mb": 0.0,
                                                   "peak_cuda_mb": 0.0,
                                                   "bytes_up": 0, "bytes_down": 0})
        total["rounds"] += 1
        total["peak_train_mem_mb"] = max(total["peak_train_mem_mb"], rec["peak_train_mem_mb"])
        total["peak_rss_mb"] = max(total["peak_rss_mb"], u.report.peak_rss_mb)
        total["peak_cuda_mb"] = max(total["peak_cuda_mb"], u.report.peak_cuda_mb)
        total["bytes_up"] += u.report.bytes_up
        total["bytes_down"] += u.report.bytes_down
        return rec

    def round_clock(self, per_device: list[dict], wall: float) -> float:
        """A synchronous round lasts as long as its slowest device."""
        if self.cfg.clock == "wall":
            return wall
        return max((d["clock_s"] for d in per_device), default=0.0)


def plan_summary(plan: Plan, num_layers: int) -> dict:
    """What a device was asked to do, in three numbers: LoRA layers trained, their ranks summed,
    and the mean probability that a resident layer is skipped in a step (and the cap on the
    layers a step runs, where there is one)."""
    trained, running = plan.trained(num_layers), plan.running(num_layers)
    summary = {"layers": len(trained), "rank_sum": sum(plan.ranks[l] for l in trained),
               "drop": round(sum(1 - p for p in running.values()) / max(len(running), 1), 4)}
    return summary | ({"max_active": plan.max_active} if plan.max_active else {})


def personal_accuracy(per_device: list[dict], updates: list) -> float | None:
    """Each device's own model on its own validation split, weighted by its samples."""
    pairs = [(d["personal_accuracy"], u.samples) for d, u in zip(per_device, updates) if "personal_accuracy" in d]
    return sum(a * n for a, n in pairs) / sum(n for _, n in pairs) if pairs else None
