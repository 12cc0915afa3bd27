"""The aggregator's round loop (docs/architecture.md, "The round protocol"), the same for every transport.

It owns the global state: each round it asks the strategy for plans, has the transport run them,
admits the updates, takes the strategy's new state, evaluates it, and hands the round to the
recorder and the checkpoint."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
import sys
import time
from pathlib import Path

from tqdm import tqdm

from testbed.comm.transport import Transport
from testbed.core.config import CAUSAL_LM, to_dict
from testbed.core.plan import Job, LayerProbe, Plan, Update
from testbed.core.state import GlobalState
from testbed.measure.evaluate import evaluate
from testbed.measure.probe import probe_layers
from testbed.model.lora import get_head, init_lora
from testbed.server.admission import admit
from testbed.server.checkpoint import (Checkpoint, capture_rng,
                                       load_checkpoint, restore_rng,
                                       write_checkpoint)
from testbed.server.experiment import Experiment
from testbed.server.recorder import RoundTimes, RunRecorder, table
from testbed.server.strategies import STRATEGIES
from testbed.server.strategies.base import Context, Strategy


def make_strategy(exp: Experiment) -> Strategy:
    samples = {d: len(s.train) for d, s in exp.data.shards.items()}
    probe = None if exp.data.proxy is None else functools.partial(server_probe, exp)
    ctx = Context(exp.cfg, exp.info, exp.devices, samples, exp.cost, probe)
    return STRATEGIES[exp.cfg.strategy.name](ctx)


def initial_state(exp: Experiment, strategy: Strategy) -> GlobalState:
    """Every layer's LoRA at the strategy's maximum rank, and the model's head."""
    layers = list(range(exp.info.num_layers))
    head = {n: t.cpu() for n, t in get_head(exp.bb).items()}  # the global state lives on the CPU
    return GlobalState(init_lora(exp.info, layers, strategy.max_rank(exp.cfg), exp.cfg.seed), head)


def server_probe(exp: Experiment, state: GlobalState, rows: int, blocks: bool) -> LayerProbe:
    """Probe the global model (by layer, or by block) on a fixed, seeded sample of the run's public
    proxy set (data.proxy_file): the only rows a real server holds, so never the devices'."""
    proxy = exp.data.proxy
    idx = random.Random(exp.cfg.seed).sample(range(len(proxy)), min(rows, len(proxy)))
    return probe_layers(exp.bb, state.lora, state.head, proxy.take(sorted(idx)), exp.cfg.model.lora, blocks)[0]


SPEED_EMA = 0.5  # weight of the previous estimate in the moving average of device speeds


class RoundLoop:
    """An experiment's rounds over a transport, from the first or from a checkpoint (`resume`)."""

    def __init__(self, exp: Experiment, transport: Transport, out: Path, quiet: bool = False,
                 resume: bool = False):
        self.exp = exp
        self.cfg = exp.cfg
        self.transport = transport
        self.out = out
        self.quiet = quiet
        self.strategy = make_strategy(exp)
        self.state = initial_state(exp, self.strategy)
        self.shard_sizes = {d: len(s.train) for d, s in exp.data.shards.items()}
        self.first_round = 0
        self.clock_s = 0.0
        self.wall_s = 0.0
        resumed = load_checkpoint(out) if resume else None
        if resumed:  # before the recorder rewrites the run directory: a refused resume leaves it as it was
            self.restore(resumed)
        self.recorder = RunRecorder(out, exp, resumed.record if resumed else None)

    def checkpoint(self, r: int) -> None:
        write_checkpoint(self.out, Checkpoint(
            round=r, state=self.state, strategy=self.strategy.state_dict(), clock_s=self.clock_s, wall_s=self.wall_s,
            record=self.recorder.record, transport=self.transport.state_dict(),
            device_state={n: dataclasses.asdict(d) for n, d in self.exp.devices.items()}, rng=capture_rng(),
            config=to_dict(self.cfg)))

    def restore(self, c: Checkpoint) -> None:
        self.first_round = c.round + 1
        self.state = c.state
        self.strategy.load_state_dict(c.strategy)
        self.clock_s, self.wall_s = c.clock_s, c.wall_s
        self.transport.load_state_dict(c.transport)
        for name, fields in c.device_state.items():  # speeds refreshed online on the wall clock
            for key, value in fields.items():
                setattr(self.exp.devices[name], key, value)
        restore_rng(c.rng)
        print(f"testbed: resuming after round {c.round + 1} of {self.cfg.rounds}", file=sys.stderr)  # as the bar counts

    def run(self) -> dict:
        desc = f"{self.cfg.strategy.name}" + (" [synthetic data]" if self.exp.data.synthetic else "")
        bar = tqdm(range(self.first_round, self.cfg.rounds), desc=desc, unit="round", initial=self.first_round,
                   total=self.cfg.rounds, disable=self.quiet, file=sys.stderr, dynamic_ncols=True)
        for r in bar:
            row = self.round(r)
            if row.get("accuracy") is not None:
                bar.set_postfix(acc=f"{row['accuracy']:.3f}", clock=f"{row['clock_s']:.0f}s")
        summary = self.recorder.summary()
        if not self.quiet:
            print(table(summary))
        return summary

    def round(self, r: int) -> dict:
        start = time.perf_counter()
        plans = self.strategy.plan(r, self.transport.available(list(self.exp.devices)), self.state)
        jobs = {d: Job(p, self.state.downlink(p, self.exp.info.num_layers), self.state.head) for d, p in plans.items()}
        sent = time.perf_counter()
        result = self.transport.run_round(r, jobs)
        train_wall = time.perf_counter() - sent
        updates = admit(r, plans, result, self.exp.info, self.state.head, self.shard_sizes)
        self.state = self.strategy.aggregate(r, updates, result.failures, self.state)
        evaluated = time.perf_counter()
        metrics = self.evaluate(r) | (self.zero_shot() if r == 0 else {})
        eval_wall = time.perf_counter() - evaluated
        self.strategy.observe(r, {u.device: u.report for u in updates}, metrics)
        if self.cfg.clock == "wall":
            self.refresh_speeds(plans, updates)
        device_s = {u.device: self.exp.cost.round_seconds(self.exp.devices[u.device], plans[u.device])
                    for u in updates}
        # A synchronous round lasts as long as its slowest device.
        round_s = time.perf_counter() - start if self.cfg.clock == "wall" else max(device_s.values(), default=0.0)
        self.clock_s += round_s
        self.wall_s += time.perf_counter() - start
        times = RoundTimes(self.clock_s, self.wall_s, train_wall, eval_wall, device_s, round_s)
        row = self.recorder.round(r, plans, updates, result.failures, metrics, times)
        self.checkpoint(r)
        return row

    def refresh_speeds(self, plans: dict[str, Plan], updates: list[Update]) -> None:
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

    def zero_shot(self) -> dict:
        """Task causal_lm: the untuned model on the test set (no LoRA), which round 0's row reports
        beside the tuned one's figures: the baseline fine-tuning has to beat."""
        if self.cfg.task != CAUSAL_LM:
            return {}
        key = zero_shot_key(self.exp)
        if key not in ZERO_SHOT:
            m = evaluate(self.exp.bb, {}, self.state.head, self.exp.data.test, self.cfg.model.lora,
                         self.cfg.train.eval_batch_size)
            ZERO_SHOT[key] = {"zero_shot_accuracy": m["accuracy"], "zero_shot_loss": m["loss"]}
        return dict(ZERO_SHOT[key])


# The untuned model's figures by zero_shot_key, computed once a process: a study's cells share
# their model and test set, and scoring 800 rows on a 30-layer model takes a minute.
ZERO_SHOT: dict[str, dict] = {}


def zero_shot_key(exp: Experiment) -> str:
    """What the untuned model's figures depend on: the model (seeded, for a randomly initialised
    one), the evaluation batch and the test set's tokens, byte for byte."""
    h = hashlib.sha256(json.dumps([to_dict(exp.cfg.model), exp.cfg.seed, exp.cfg.train.eval_batch_size]).encode())
    test = exp.data.test
    for t in (test.input_ids, test.attention_mask, test.labels):
        h.update(t.numpy().tobytes())
    if test.choices is not None:
        h.update(json.dumps(test.choices.options).encode())
        h.update(test.choices.answers.numpy().tobytes())
    return h.hexdigest()
