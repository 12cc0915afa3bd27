"""DropPEFT: the layer-dropout kernel on MiniLM, and the study against FedLoRA.

Kernel: mean step time at uniform drop ratio p in {0, 0.25, 0.5, 0.75} (batch 16, length 64,
2 threads, 30 steps per p, full: 3 repeats interleaved, medians) against the ideal
fixed + f x layer cost, where f is the fraction of layer-steps actually run (1 - p in
expectation; dropout is sampled), fixed = the step with every layer dropped and layer cost =
the all-layer step minus fixed; and the counted training footprint at each p (peak step and
mean over steps).
Study: bench/study.py (8 Jetson-class devices, Dirichlet 0.5, modelled clock): `fedlora` (its
devices also validate, for personalised accuracy), `droppeft` with its defaults, and
`droppeft-ptls` (`personal_k: 1`: the top layer's LoRA stays on the devices).
--quick: 10 steps per p, one repeat, the quick study.  --study DIR: the kernel, and the study's
comparison read, per split over its seeds, from the `testbed compare` study in DIR instead of
run (`make bench` passes the study it has just run).  One JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from study import DATA, ROOT, compare, from_study, run, study_sets

from testbed.agent.trainer import train_plan
from testbed.core.config import (DataConfig, LoraConfig, ModelConfig,
                                 TrainConfig)
from testbed.core.plan import Plan
from testbed.data import load_splits, tokenize
from testbed.model.info import model_info
from testbed.model.load import load_backbone
from testbed.model.lora import init_lora

PS = [0.0, 0.25, 0.5, 0.75, 1.0]


def kernel(steps: int, repeats: int) -> dict:
    torch.set_num_threads(2)
    lora_cfg = LoraConfig(rank=8, alpha=16, targets=["query", "value"])
    bb = load_backbone(ModelConfig(name="minilm", lora=lora_cfg), 4, seed=0)
    train, _, _ = load_splits(DataConfig(source="files", train_file=str(DATA / "train.csv"),
                                         test_file=str(DATA / "test.csv"), text_columns=["title", "description"],
                                         label_offset=1, max_train=512, max_test=16), 0)
    tokens = tokenize(bb.tokenizer, train, 64)
    layers = list(range(bb.num_layers))
    lora = init_lora(model_info(bb), layers, 8, seed=0)
    head = {n: p.detach().clone() for n, p in bb.head_params().items()}
    times: dict[float, list[float]] = {p: [] for p in PS}
    active: dict[float, list[float]] = {p: [] for p in PS}
    memory: dict[float, tuple[float, float]] = {}
    for _ in range(repeats):
        for p in PS:
            plan = Plan(ranks=dict.fromkeys(layers, 8), drop=dict.fromkeys(layers, p), local_steps=steps,
                        batch_size=16)
            res = train_plan(bb, plan, lora, head, tokens, list(range(len(tokens))), lora_cfg, TrainConfig(), seed=1)
            times[p].append(res.compute_s / steps)
            active[p].append(sum(res.active_steps.values()) / (steps * len(layers)))
            memory[p] = (res.footprint_mb, res.footprint_mean_mb)
    t = {p: statistics.median(v) for p, v in times.items()}
    fixed, layer_cost = t[1.0], t[0.0] - t[1.0]
    table = {}
    for p in PS[:-1]:
        ran = statistics.fmean(active[p])
        ideal = fixed + ran * layer_cost
        table[str(p)] = {"layers_run_fraction": round(ran, 3), "step_s": round(t[p], 4), "ideal_s": round(ideal, 4),
                         "speedup": round(t[0.0] / t[p], 3), "ideal_speedup": round(t[0.0] / ideal, 3),
                         "fraction_of_ideal": round((t[0.0] / t[p]) / (t[0.0] / ideal), 3),
                         "footprint_peak_mb": round(memory[p][0], 2), "footprint_mean_mb": round(memory[p][1], 2)}
    return {"fixed_s": round(fixed, 4), "layer_cost_s": round(layer_cost, 4), "by_p": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--study", type=Path, help="read the comparison from this study's report instead of running it")
    args = ap.parse_args()
    k = kernel(10 if args.quick else 30, 1 if args.quick else 3)
    for p, row in k["by_p"].items():
        print(f"p={p:<5} step {row['step_s']:.3f} s  ideal {row['ideal_s']:.3f} s  "
              f"{100 * row['fraction_of_ideal']:.1f} % of ideal speedup  footprint peak "
              f"{row['footprint_peak_mb']} MB, mean {row['footprint_mean_mb']} MB")
    if args.study:
        print(json.dumps({"bench": "droppeft", "quick": args.quick, "kernel": k, "study": str(args.study),
                          "by_setting": from_study(args.study, ["fedlora", "droppeft"])}))
        return
    out = ROOT / "bench" / "results" / ("droppeft-quick" if args.quick else "droppeft")
    sets = study_sets(args.quick)
    runs = {"fedlora": ["strategy.name=fedlora", "strategy.validate=true"], "droppeft": ["strategy.name=droppeft"],
            "droppeft-ptls": ["strategy.name=droppeft", "strategy.personal_k=1"]}
    results = {name: run(name, sets + extra, Path(out)) for name, extra in runs.items()}
    print(json.dumps({"bench": "droppeft", "quick": args.quick, "kernel": k, "results": results,
                      "vs_fedlora": compare(results)}))


if __name__ == "__main__":
    main()
