"""SmolLM2 (the bundled 30-layer LLaMA): conversion, step time, an agent's memory by the layers it
holds, FedLoRA's accuracy against the untuned model's, and the cost of scoring label words.

- convert: the GGUF file converted into a fresh temporary cache (a machine's first use), then
  the cached checkpoint loaded (model and tokenizer), each in a process of its own.
- step: a LoRA training step of the project's trainer (r=8 on q_proj and v_proj of every layer)
  on AG News instruction rows, task causal_lm, length 64; batch 8 and 16 at 1 and 2 threads;
  the median of `steps` steps after a warm-up.
- memory: an agent in a process of its own holding the top 8, 15 and 30 layers as a dist agent
  does (a layer read from the cache only when its plan runs it), one round of 3 steps at batch
  8: the counted training footprint, the round's peak RSS and the process's lifetime peak.
- accuracy: examples/agnews-llm.yaml (FedLoRA, 4 IID devices, AG News as instruction
  classification, 400 test rows), evaluated after rounds 5 and 10: the best accuracy against the
  untuned model's zero-shot accuracy (fine-tuning must gain 10 points); and the same rows with a
  classification head on SmolLM2 (task classification) for comparison.
- scoring: seconds to score 800 test rows (each label word's log-likelihood, batches of 16) with
  the untuned model, and its zero-shot accuracy on them.

Full: all of it (about an hour on 2 quiet cores; training steps dominate).  --quick: conversion,
batch 8 at 1 thread, 8 and 30 layers, one short round on 80 test rows, scoring 80 rows (under
5 min).
One JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.core.config import load_config  # noqa: E402

EXAMPLE = ROOT / "examples" / "agnews-llm.yaml"
DATA = ROOT / "data" / "ag_news"


def example(cache: str, sets: list[str] = ()) -> list[str]:
    """Overrides of examples/agnews-llm.yaml: data paths from anywhere, the bench's cache."""
    return [f"data.train_file={DATA / 'train.csv'}", f"data.test_file={DATA / 'test.csv'}",
            f"model.cache_dir={cache}", *sets]


def in_child(*args: str) -> dict:
    """This script's `--child ARGS` in a fresh process: its JSON line."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
    if proc.returncode:
        sys.exit(f"--child {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def child(what: str, cache: str, arg: str = "") -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if what == "convert":
        from testbed.model.load import resolve_model_path

        start = time.perf_counter()
        resolve_model_path("smollm2", cache)
        return {"convert_s": round(time.perf_counter() - start, 1)}
    if what == "load":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from testbed.model.load import resolve_model_path

        path = resolve_model_path("smollm2", cache)
        start = time.perf_counter()
        AutoTokenizer.from_pretrained(path)
        AutoModelForCausalLM.from_pretrained(path)
        return {"cached_load_s": round(time.perf_counter() - start, 2)}
    return agent_memory(cache, int(arg))


def agent_memory(cache: str, keep: int) -> dict:
    """An agent holding the top `keep` layers: one round of 3 steps at batch 8."""
    import resource

    from testbed.agent.agent import Agent
    from testbed.core.plan import Job, Plan
    from testbed.experiments.setup import setup
    from testbed.model.lora import init_lora

    cfg = load_config(EXAMPLE, example(cache, ["data.max_train=200", "data.max_test=16", "devices={reference: 1}"]))
    exp = setup(cfg, agent=True)  # as a dist agent: no layer resident until a plan runs it
    n = exp.info.num_layers
    layers = list(range(n - keep, n))
    agent = Agent("reference-0", cfg, exp.bb, exp.data.train, exp.data.shards["reference-0"])
    plan = Plan(ranks=dict.fromkeys(layers, 8), layers=layers, local_steps=3, batch_size=8)
    update = agent.run(0, Job(plan, init_lora(exp.info, layers, 8, seed=0), {}))
    return {"layers": keep, "of": n, "counted_mb": round(update.report.peak_train_mem_mb, 1),
            "round_peak_rss_mb": round(update.report.peak_rss_mb, 1),
            "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def step_times(exp, batches: list[int], threads: list[int], steps: int) -> dict:
    from testbed.agent.trainer import train_plan
    from testbed.core.plan import Plan
    from testbed.model.lora import init_lora

    layers = list(range(exp.info.num_layers))
    lora = init_lora(exp.info, layers, 8, seed=0)
    train = exp.data.train
    out = {}
    for t in threads:
        torch.set_num_threads(t)
        for b in batches:
            def run(n: int, b: int = b):
                plan = Plan(ranks=dict.fromkeys(layers, 8), local_steps=n, batch_size=b)
                return train_plan(exp.bb, plan, lora, {}, train, list(range(len(train))), exp.cfg.model.lora,
                                  exp.cfg.train, seed=0)
            run(1)  # warm-up: this thread count's kernels and buffers
            out[f"batch_{b}_threads_{t}"] = round(run(steps).step_s, 3)
            print(f"  step, batch {b}, {t} threads: {out[f'batch_{b}_threads_{t}']} s", file=sys.stderr)
    return out


def scoring(exp, rows: int) -> dict:
    from testbed.measure.scoring import choose

    exp.bb.model.eval()
    idx = list(range(min(rows, len(exp.data.test))))
    start = time.perf_counter()
    chosen = choose(exp.bb.model, exp.data.test, idx, exp.bb.tokenizer.pad_token_id, batch_size=16)
    seconds = time.perf_counter() - start
    accuracy = (chosen == exp.data.test.choices.answers[idx]).float().mean().item()
    print(f"  scored {len(idx)} rows in {seconds:.1f} s (zero-shot accuracy {accuracy:.3f})", file=sys.stderr)
    return {"rows": len(idx), "seconds": round(seconds, 1), "zero_shot_accuracy": round(accuracy, 4)}


def accuracy(cache: str, quick: bool) -> dict:
    from testbed.experiments.run import run_inprocess

    short = ["rounds=1", "data.max_test=80", "train.local_steps=2", "model.threads=1"] if quick else ["eval_every=5"]
    head = ["task=classification", "data.prompt=''", "data.label_words=[]", "data.text_columns=[title, description]"]
    variants = {"instruction": [], "classification_head": head}
    out = {}
    for name, sets in variants.items():
        start = time.perf_counter()
        cfg = load_config(EXAMPLE, example(cache, short + sets))
        out_dir = ROOT / "bench" / "results" / f"llm{'-quick' if quick else ''}" / name
        s = run_inprocess(cfg, out_dir, quiet=True, force=True)  # replaces the last results
        out[name] = {"rounds": s["rounds"], "best_accuracy": s["best_accuracy"], "final_accuracy": s["final_accuracy"],
                     "zero_shot_accuracy": s.get("zero_shot_accuracy"), "wall_s": round(time.perf_counter() - start, 1)}
        print(f"  {name}: {out[name]}", file=sys.stderr)
    instruction = out["instruction"]
    instruction["gain_points"] = round(100 * (instruction["best_accuracy"] - instruction["zero_shot_accuracy"]), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    threads = [1] if args.quick else [1, 2]
    os.environ["BENCH_THREADS"] = str(max(threads))
    with tempfile.TemporaryDirectory() as cache:
        convert = {**in_child("convert", cache), **in_child("load", cache)}
        result = {"bench": "llm", "quick": args.quick, "convert": convert}
        print(f"  {result['convert']}", file=sys.stderr)
        result["memory"] = [in_child("memory", cache, str(k)) for k in ((8, 30) if args.quick else (8, 15, 30))]
        for row in result["memory"]:
            print(f"  {row}", file=sys.stderr)
        from testbed.experiments.setup import setup

        torch.set_num_threads(1)
        rows = 80 if args.quick else 800
        exp = setup(load_config(EXAMPLE, example(cache, ["data.max_train=400", f"data.max_test={rows}",
                                                         "model.threads=1"])))
        result["step_s"] = step_times(exp, [8] if args.quick else [8, 16], threads, 2 if args.quick else 8)
        result["scoring"] = scoring(exp, rows)
        del exp
        result["accuracy"] = accuracy(cache, args.quick)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
