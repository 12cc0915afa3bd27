"""FedPruner: memory of submodels, and accuracy of importance-aware against random selection.

Memory: MiniLM (6 layers) and a LLaMA-style model built from a config (16 layers, hidden 512,
random weights), at budgets that afford 1/4, 1/2 and all of the layers (all = what FedLoRA
trains).  Each point runs in its own process, which builds the model with only the kept
layers resident, as a device holding that submodel would, and trains 3 steps (LoRA r=8 on
every kept layer, batch 16, length 64): the counted training footprint and the process's
peak RSS.  Also the share of the parameters outside the transformer layers (embeddings,
head): pruning layers cannot save those.
Accuracy: the methods' study (bench/study.py) with the Jetson TX2s' budgets set to afford
half the layers (3 of 6): `fedlora`, `fedpruner` (importance-aware) and `fedpruner` with
`selection: random`.
--quick: MiniLM memory only at 1/2 and all, and the quick study.  One JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

LLAMA16 = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 16,
           "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 256}


def child(model: str, keep: int) -> dict:
    """In a fresh process: a model holding only `keep` layers, trained for 3 steps."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaConfig
    from transformers.utils import logging as hf_logging

    from agents.trainer import train_plan
    from testbed.config import LoraConfig, TrainConfig
    from testbed.data import Tokens
    from testbed.memory import peak_rss_mb
    from testbed.model import init_lora, model_info, resolve_model_path, wrap_model
    from testbed.plan import Plan

    hf_logging.set_verbosity_error()  # the dropped layers' and the new head's notices are expected
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if model == "minilm":
        path = resolve_model_path("minilm")
        config = AutoConfig.from_pretrained(path, num_labels=4)
        total = config.num_hidden_layers
        config.num_hidden_layers = keep  # from_pretrained then reads only the kept layers' weights
        net = AutoModelForSequenceClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True)
        targets = ["query", "value"]
    else:
        config = LlamaConfig(**{k: v for k, v in LLAMA16.items() if k != "model_type"}, num_labels=4,
                             pad_token_id=0)
        total = config.num_hidden_layers
        config.num_hidden_layers = keep
        net = AutoModelForSequenceClassification.from_config(config)
        targets = ["q_proj", "v_proj"]
    lora_cfg = LoraConfig(rank=8, alpha=16, targets=targets)
    bb = wrap_model(net, None, lora_cfg)
    info = model_info(bb)
    g = torch.Generator().manual_seed(0)
    vocab = net.config.vocab_size
    tokens = Tokens(torch.randint(5, vocab, (48, 64), generator=g), torch.ones(48, 64, dtype=torch.long),
                    torch.randint(0, 4, (48,), generator=g))
    layers = list(range(keep))
    res = train_plan(bb, Plan(ranks=dict.fromkeys(layers, 8), local_steps=3, batch_size=16),
                     init_lora(info, layers, 8, seed=0), {n: p.detach().clone() for n, p in bb.head_params().items()},
                     tokens, list(range(48)), lora_cfg, TrainConfig(), seed=0)
    layer_params = info.layer_params * keep
    return {"model": model, "layers": keep, "of": total, "counted_mb": round(res.footprint_mb, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "params_m": round((layer_params + info.other_params) / 1e6, 2),
            "outside_layers_share_of_full": round(info.other_params / (info.other_params + info.layer_params * total), 3)}


def memory(models: list[str], fractions: list[float]) -> dict:
    out = {}
    for model in models:
        n = 6 if model == "minilm" else LLAMA16["num_hidden_layers"]
        rows = []
        for f in fractions:
            keep = max(1, round(n * f))
            proc = subprocess.run([sys.executable, __file__, "--child", model, str(keep)], capture_output=True,
                                  text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
            if proc.returncode:
                sys.exit(f"{model} at {keep} layers failed:\n{proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.splitlines()[-1])
            rows.append(row)
        full = rows[-1]
        for row in rows:
            row["counted_saving"] = round(1 - row["counted_mb"] / full["counted_mb"], 3)
            row["rss_saving"] = round(1 - row["peak_rss_mb"] / full["peak_rss_mb"], 3)
            print(f"{model:<7} {row['layers']:>2}/{row['of']} layers: counted {row['counted_mb']:7.1f} MB "
                  f"({100 * row['counted_saving']:4.1f} % less than all), peak RSS {row['peak_rss_mb']:7.1f} MB "
                  f"({100 * row['rss_saving']:4.1f} % less)", file=sys.stderr)
        out[model] = rows
    return out


def accuracy(quick: bool) -> dict:
    from study import run, study_sets
    from testbed.config import load_config
    from testbed.experiment import setup
    from testbed.plan import Plan

    sets = study_sets(quick)
    exp = setup(load_config(ROOT / "examples" / "agnews-jetsons.yaml", sets))
    half = exp.cost.peak_memory_bytes(exp.devices["jetson-tx2-0"], Plan(ranks=dict.fromkeys([3, 4, 5], 8),
                                                                        layers=[3, 4, 5], batch_size=16))
    budget = f"devices.jetson-tx2={{count: 3, memory_mb: {half / 2**20 + 1:.1f}}}"
    out = ROOT / "bench" / "results" / ("fedpruner-quick" if quick else "fedpruner")
    runs = {"fedlora": ["strategy.name=fedlora"], "fedpruner": ["strategy.name=fedpruner"],
            "fedpruner_random": ["strategy.name=fedpruner", "strategy.selection=random"]}
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
