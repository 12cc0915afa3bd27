"""The in-process runtime against a plain PyTorch loop on the same job (ANCHORS.md).

The job: MiniLM + LoRA r=8 (query, value) + head, the AG News sample, 4 IID clients,
5 rounds x 10 local steps x batch 16, length 64, AdamW 5e-4, FedAvg, evaluation on 800 test
rows after every round, 2 threads.  Each variant runs in its own process (so peak RSS is its
own), alternating, `--repeats` times; medians are reported.  --quick: 2 rounds x 5 steps.
Prints one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "ag_news"


def plain_loop(rounds: int, steps: int) -> dict:
    """The floor: one Python loop, clients in turn, FedAvg by hand on peft's state dict."""
    import resource

    import torch
    from peft import (LoraConfig, get_peft_model, get_peft_model_state_dict,
                      set_peft_model_state_dict)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from testbed.core.config import DataConfig
    from testbed.data import load_splits, partition
    from testbed.model.load import resolve_model_path

    torch.set_num_threads(2)
    cfg = DataConfig(source="files", train_file=str(DATA / "train.csv"), test_file=str(DATA / "test.csv"),
                     text_columns=["title", "description"], label_offset=1, max_test=800)
    splits = load_splits(cfg, 0)
    train, test = splits.train, splits.test
    shards = partition(train.labels, ["c0", "c1", "c2", "c3"], cfg, 0)
    path = resolve_model_path("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))
    enc = lambda s: tok(s.texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    xtr, xte = enc(train), enc(test)
    ytr, yte = torch.tensor(train.labels), torch.tensor(test.labels)
    start = time.perf_counter()
    accuracy = 0.0
    for r in range(rounds):
        global_sd = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        states, sizes = [], []
        for c, shard in enumerate(shards.values()):
            set_peft_model_state_dict(model, global_sd)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
            g = torch.Generator().manual_seed(r * 100 + c)
            model.train()
            for _ in range(steps):
                idx = torch.tensor(shard.train)[torch.randint(len(shard.train), (16,), generator=g)]
                loss = model(input_ids=xtr["input_ids"][idx], attention_mask=xtr["attention_mask"][idx],
                             labels=ytr[idx]).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
            states.append({k: v.clone() for k, v in get_peft_model_state_dict(model).items()})
            sizes.append(len(shard.train))
        total = sum(sizes)
        set_peft_model_state_dict(model, {k: sum(s[k] * n / total for s, n in zip(states, sizes)) for k in states[0]})
        model.eval()
        with torch.no_grad():
            correct = sum((model(input_ids=xte["input_ids"][i:i + 64], attention_mask=xte["attention_mask"][i:i + 64])
                           .logits.argmax(-1) == yte[i:i + 64]).sum().item() for i in range(0, len(yte), 64))
        accuracy = correct / len(yte)
    return {"wall_s": time.perf_counter() - start, "accuracy": accuracy,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def testbed_run(rounds: int, steps: int, out: str) -> dict:
    import resource

    sys.path.insert(0, str(ROOT))
    from testbed.core.config import load_config
    from testbed.experiments.run import run_inprocess

    cfg = load_config(ROOT / "examples" / "agnews.yaml", [
        f"data.train_file={DATA / 'train.csv'}", f"data.test_file={DATA / 'test.csv'}", f"rounds={rounds}",
        f"train.local_steps={steps}", "devices={reference: 4}", "model.threads=2"])
    start = time.perf_counter()
    s = run_inprocess(cfg, Path(out), quiet=True, force=True)  # replaces the last results
    return {"wall_s": time.perf_counter() - start, "accuracy": s["final_accuracy"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(variant: str, rounds: int, steps: int, out: str) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); import inprocess as b; "
            f"print(json.dumps(b.{variant}({rounds}, {steps}" + (f", {out!r}" if variant == "testbed_run" else "")
            + ")))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"bench/inprocess.py: {variant} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    rounds, steps = (2, 5) if args.quick else (5, 10)
    repeats = args.repeats or (1 if args.quick else 2)
    runs = {"plain_loop": [], "testbed_run": []}
    for i in range(repeats):
        for variant in runs:
            res = child(variant, rounds, steps, str(ROOT / "bench" / "results" / "inprocess" / f"run{i}"))
            runs[variant].append(res)
            print(f"{variant:<12} wall {res['wall_s']:.1f} s  rss {res['peak_rss_mb']:.0f} MB  "
                  f"acc {res['accuracy']:.4f}", file=sys.stderr)
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss_mb", "accuracy")}
           for v, rs in runs.items()}
    print(json.dumps({"bench": "inprocess", "quick": args.quick, "rounds": rounds, "local_steps": steps,
                      "repeats": repeats, "median": med,
                      "wall_ratio": med["testbed_run"]["wall_s"] / med["plain_loop"]["wall_s"],
                      "rss_ratio": med["testbed_run"]["peak_rss_mb"] / med["plain_loop"]["peak_rss_mb"]}))


if __name__ == "__main__":
    main()
