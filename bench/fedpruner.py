"""FedPruner: memory of submodels, and accuracy of importance-aware against random selection.

Memory: MiniLM (6 layers) and a LLaMA-style model built from a config (16 layers, hidden 512,
random weights, saved once to a temporary checkpoint), at budgets that afford 1/4, 1/2 and all
of the layers (all = what FedLoRA trains).  Each point runs in its own process as a dist agent
does: the backbone starts with no layer resident, the agent's round reads only the plan's kept
layers (the top k) from the checkpoint and trains 3 steps (LoRA r=8 on every kept layer, batch
16, length 64).  Reported per device: the counted training footprint, the peak RSS of the
agent's round (the high-water mark is reset when the round starts), and the process's
lifetime peak RSS.  Also the share of the parameters outside the transformer layers
(embeddings, head): pruning layers cannot save those.
Accuracy: the methods' study (bench/study.py) with the Jetson TX2s' budgets set to afford
half the layers (3 of 6): `fedlora`, `fedpruner` (importance-aware), `fedpruner` with
`selection: random`, and `fedpruner_fine` (attention and FFN blocks as units).
--quick: MiniLM memory only at 1/2 and all, and the quick study.  One JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from testbed.core.plan import Job

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

LLAMA16 = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 16, "num_attention_heads": 8,
           "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 256}


def save_llama16(folder: Path) -> str:
    """The random LLaMA-style model as a checkpoint (agents read their layers from one)."""
    import torch
    from transformers import (AutoTokenizer, LlamaConfig,
                              LlamaForSequenceClassification)

    from testbed.model.load import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))  # 30522 ids fit the 32000 embeddings
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(**LLAMA16, num_labels=4, pad_token_id=tok.pad_token_id)) \
        .save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def child(model: str, keep: int) -> dict:
    """In a fresh process: an agent whose plan keeps the top `keep` layers, one round of 3 steps."""
    import resource

    from testbed.agent.agent import Agent
    from testbed.core.config import from_dict
    from testbed.core.plan import Plan
    from testbed.experiments.setup import setup
    from testbed.model.lora import get_head, init_lora

    cfg = from_dict({"seed": 0, "model": {"name": model, "max_length": 64, "threads": 2,
                                          "lora": {"rank": 8, "alpha": 16}},
                     "data": {"synthetic_train": 200, "synthetic_test": 16}, "devices": {"reference": 1}})
    exp = setup(cfg, agent=True)  # as a dist agent: no layer resident until a plan runs it
    n = exp.info.num_layers
    layers = list(range(n - keep, n))
    agent = Agent("reference-0", cfg, exp.bb, exp.data.train, exp.data.shards["reference-0"])
    plan = Plan(ranks=dict.fromkeys(layers, 8), layers=layers, local_steps=3, batch_size=16)
    update = agent.run(0, Job(plan, init_lora(exp.info, layers, 8, seed=0), get_head(exp.bb)))
    info = exp.info
    return {"layers": keep, "of": n, "counted_mb": round(update.report.peak_train_mem_mb, 1),
            "round_peak_rss_mb": round(update.report.peak_rss_mb, 1),
            "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "params_m": round((info.layer_params * keep + info.other_params) / 1e6, 2),
            "outside_layers_share_of_full": round(info.other_params / (info.other_params + info.layer_params * n), 3)}


def memory(models: list[str], fractions: list[float]) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            out[model] = memory_of(model, save_llama16(Path(tmp)) if model == "llama16" else model, fractions)
    return out


def memory_of(model: str, path: str, fractions: list[float]) -> list[dict]:
    n = 6 if model == "minilm" else LLAMA16["num_hidden_layers"]
    rows = []
    for f in fractions:
        keep = max(1, round(n * f))
        proc = subprocess.run([sys.executable, __file__, "--child", path, str(keep)], capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
        if proc.returncode:
            sys.exit(f"{model} at {keep} layers failed:\n{proc.stderr[-2000:]}")
        rows.append({"model": model, **json.loads(proc.stdout.splitlines()[-1])})
    full = rows[-1]
    for row in rows:
        for key in ("counted_mb", "round_peak_rss_mb", "process_peak_rss_mb"):
            row[key.removesuffix("_mb") + "_saving"] = round(1 - row[key] / full[key], 3)
        print(f"{model:<7} {row['layers']:>2}/{row['of']} layers: counted {row['counted_mb']:7.1f} MB "
              f"({100 * row['counted_saving']:4.1f} % less than all), round peak RSS {row['round_peak_rss_mb']:7.1f} MB "
              f"({100 * row['round_peak_rss_saving']:4.1f} % less), process peak {row['process_peak_rss_mb']:7.1f} MB",
              file=sys.stderr)
    return rows


def accuracy(quick: bool) -> dict:
    from study import run, study_sets

    from testbed.core.config import load_config
    from testbed.core.plan import Plan
    from testbed.experiments.setup import setup

    sets = study_sets(quick)
    exp = setup(load_config(ROOT / "examples" / "agnews-jetsons.yaml", sets))
    half = exp.cost.peak_memory_bytes(exp.devices["jetson-tx2-0"], Plan(ranks=dict.fromkeys([3, 4, 5], 8),
                                                                        layers=[3, 4, 5], batch_size=16))
    budget = f"devices.jetson-tx2={{count: 3, memory_mb: {half / 2**20 + 1:.1f}}}"
    out = ROOT / "bench" / "results" / ("fedpruner-quick" if quick else "fedpruner")
    runs = {"fedlora": ["strategy.name=fedlora"], "fedpruner": ["strategy.name=fedpruner"],
            "fedpruner_random": ["strategy.name=fedpruner", "strategy.selection=random"],
            "fedpruner_fine": ["strategy.name=fedpruner_fine"]}
    return {name: run(name, sets + [budget] + extra, out) for name, extra in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    mem = memory(["minilm"], [0.5, 1.0]) if args.quick else memory(["minilm", "llama16"], [0.25, 0.5, 1.0])
    acc = accuracy(args.quick)
    gap = {k: round(v["final_accuracy"] - acc["fedlora"]["final_accuracy"], 4) for k, v in acc.items()}
    print(json.dumps({"bench": "fedpruner", "quick": args.quick, "memory": mem, "accuracy": acc,
                      "final_accuracy_minus_fedlora": gap}))


if __name__ == "__main__":
    main()
