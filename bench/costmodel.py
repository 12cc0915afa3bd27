"""The cost model against measurement, on MiniLM on this machine.

A profile is measured first (`testbed profile`'s code, batch 16, length 64, with the step's
terms fitted to whole steps at a few shapes), or read with --profile FILE.  Then random plans
(pruned layers, per-layer ranks 2-16 on a random subset, layer dropout 0-0.5, personal layers,
batch 8/16/32, sequence length 32/64/128) are each
trained for real for 5 steps after a warm-up step (AG News sample, 2 threads): the median
step time against `CostModel.step_seconds`, and the counted training footprint (resident
parameters, LoRA gradients and AdamW state, bytes saved for backward, at the peak step)
against `CostModel.peak_memory_bytes`.  The memory prediction is the worst case over layer
dropout, so plans with dropout are compared with a step where every layer ran (the last
step runs with dropout switched off).  Also: step time as the number of resident layers
grows (LoRA r=8 on each, batch 16, length 64), measured and predicted.  The step-time error is
reported overall (median, worst) and by sequence length and by batch size (median per group),
with the load average seen, since other processes on the machine skew every timing.
Full: 40 plans.  --quick: 20 plans, 3 steps each.  One JSON object on the last line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "ag_news"

from testbed.agent.trainer import train_plan  # noqa: E402
from testbed.core.config import (DataConfig, LoraConfig,  # noqa: E402
                                 ModelConfig, TrainConfig)
from testbed.core.devices import CLASSES, Device  # noqa: E402
from testbed.core.plan import Plan  # noqa: E402
from testbed.data import load_splits, tokenize  # noqa: E402
from testbed.measure.activations import measure_activations
from testbed.measure.memory import MIB
from testbed.measure.profiler import load_profile, profile_device  # noqa: E402
from testbed.model.info import model_info
from testbed.model.load import load_backbone
from testbed.model.lora import init_lora
from testbed.server.costmodel import CostModel  # noqa: E402

LORA = LoraConfig(rank=8, alpha=16, targets=["query", "value"])
REFERENCE = Device("reference", "reference", 1.0, CLASSES["reference"].memory_mb, 1000, 0.2)


def random_plan(rng: random.Random, n: int, steps: int) -> tuple[Plan, int]:
    layers = sorted(rng.sample(range(n), rng.randint(2, n))) if rng.random() < 0.4 else list(range(n))
    trained = [l for l in layers if rng.random() < 0.7] or [layers[-1]]
    ranks = {l: rng.choice([2, 4, 8, 16]) for l in trained}
    drop = {l: rng.choice([0.25, 0.5]) for l in layers if rng.random() < 0.3}
    personal = [l for l in trained if rng.random() < 0.15]
    plan = Plan(ranks=ranks, layers=None if len(layers) == n else layers, drop=drop, personal=personal,
                local_steps=steps, batch_size=rng.choice([8, 16, 32]))
    return plan, rng.choice([32, 64, 128])


class Bench:
    """One backbone, its tokens and cost model per sequence length."""

    def __init__(self, profile_path: str | None):
        torch.set_num_threads(2)
        self.bb = load_backbone(ModelConfig(name="minilm", lora=LORA), 4, seed=0)
        self.info = model_info(self.bb)
        start = time.perf_counter()
        self.profile = (load_profile(Path(profile_path), self.info) if profile_path
                        else profile_device(self.bb, "minilm", self.info, LORA))
        self.profile_s = time.perf_counter() - start
        self.train = load_splits(DataConfig(source="files", train_file=str(DATA / "train.csv"),
                                            test_file=str(DATA / "test.csv"),
                                            text_columns=["title", "description"], label_offset=1,
                                            max_train=512, max_test=16), 0).train
        self.head = {k: p.detach().clone() for k, p in self.bb.head_params().items()}
        self.by_len: dict[int, tuple] = {}

    def at_length(self, seq_len: int) -> tuple:
        if seq_len not in self.by_len:
            tokens = tokenize(self.bb.tokenizer, self.train, seq_len)
            acts = measure_activations(self.bb, LORA, seq_len)
            heads = {k: tuple(p.shape) for k, p in self.head.items()}
            self.by_len[seq_len] = tokens, CostModel(self.info, seq_len, acts, heads, self.profile)
        return self.by_len[seq_len]

    def measure(self, plan: Plan, seq_len: int) -> dict:
        tokens, cost = self.at_length(seq_len)
        lora = {l: init_lora(self.info, [l], r, seed=0)[l] for l, r in plan.ranks.items()}
        indices = list(range(len(tokens)))
        steps = plan.local_steps
        timed = train_plan(self.bb, plan, lora, self.head, tokens, indices, LORA, TrainConfig(), seed=1)
        full = Plan(**{**plan.__dict__, "drop": {}, "local_steps": 1})  # every layer runs: the worst case
        peak = train_plan(self.bb, full, lora, self.head, tokens, indices, LORA, TrainConfig(), seed=2)
        return {"seq_len": seq_len, "batch": plan.batch_size, "layers": len(plan.resident(self.info.num_layers)),
                "lora_layers": len(plan.ranks), "ranks": sorted(set(plan.ranks.values())),
                "max_drop": max(plan.drop.values(), default=0.0), "steps": steps,
                "step_s": timed.step_s, "predicted_s": cost.step_seconds(REFERENCE, plan),
                "footprint_mb": max(timed.footprint_mb, peak.footprint_mb),
                "predicted_mb": cost.peak_memory_bytes(REFERENCE, plan) / MIB}


def rel(measured: float, predicted: float) -> float:
    return abs(predicted - measured) / measured


def median_error_by(rows: list[dict], key: str) -> dict[int, float]:
    """The median step-time error of the plans sharing each value of `key`."""
    return {v: round(statistics.median(r["time_error"] for r in rows if r[key] == v), 4)
            for v in sorted({r[key] for r in rows})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", help="a DeviceProfile file to predict from (default: profile this machine now)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    plans, steps = (20, 3) if args.quick else (40, 5)
    bench = Bench(args.profile)
    print(f"profile: {bench.profile_s:.1f} s, fit {bench.profile.fit}", file=sys.stderr)
    # Warm-up: the first step on a fresh process pays for allocator growth and kernel selection.
    bench.measure(Plan(ranks=dict.fromkeys(range(6), 8), local_steps=2), 64)
    rng = random.Random(args.seed)
    rows = []
    for i in range(plans):
        plan, seq_len = random_plan(rng, bench.info.num_layers, steps + 1)
        row = bench.measure(plan, seq_len)
        row["time_error"] = rel(row["step_s"], row["predicted_s"])
        row["memory_error"] = rel(row["footprint_mb"], row["predicted_mb"])
        rows.append(row)
        print(f"plan {i + 1:>2}/{plans}: L={seq_len:<3} b={plan.batch_size:<2} layers={row['layers']} "
              f"lora={row['lora_layers']} ranks={row['ranks']} drop<={row['max_drop']}  "
              f"step {row['step_s']:.3f} s vs {row['predicted_s']:.3f} ({100 * row['time_error']:.1f} %)  "
              f"footprint {row['footprint_mb']:.1f} MiB vs {row['predicted_mb']:.1f} "
              f"({100 * row['memory_error']:.1f} %)", file=sys.stderr)
    scaling = []
    for k in range(1, bench.info.num_layers + 1):
        layers = list(range(bench.info.num_layers - k, bench.info.num_layers))
        row = bench.measure(Plan(ranks=dict.fromkeys(layers, 8), layers=layers, local_steps=steps + 1), 64)
        scaling.append({"layers": k, "step_s": round(row["step_s"], 4), "predicted_s": round(row["predicted_s"], 4)})
        print(f"{k} layers: step {row['step_s']:.3f} s, predicted {row['predicted_s']:.3f} s", file=sys.stderr)
    worst_t = max(rows, key=lambda r: r["time_error"])
    worst_m = max(rows, key=lambda r: r["memory_error"])
    keep = ("seq_len", "batch", "layers", "lora_layers", "ranks", "max_drop", "step_s", "predicted_s",
            "footprint_mb", "predicted_mb")
    print(json.dumps({
        "bench": "costmodel", "quick": args.quick, "plans": plans, "profile_s": round(bench.profile_s, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "fit": dataclasses.asdict(bench.profile.fit) if bench.profile.fit else None,
        "step_time_median_abs_rel_error": round(statistics.median(r["time_error"] for r in rows), 4),
        "step_time_median_error_by_length": median_error_by(rows, "seq_len"),
        "step_time_median_error_by_batch": median_error_by(rows, "batch"),
        "footprint_median_abs_rel_error": round(statistics.median(r["memory_error"] for r in rows), 4),
        "step_time_worst": {k: worst_t[k] for k in keep} | {"error": round(worst_t["time_error"], 4)},
        "footprint_worst": {k: worst_m[k] for k in keep} | {"error": round(worst_m["memory_error"], 4)},
        "step_time_by_layers": scaling}))


if __name__ == "__main__":
    main()
