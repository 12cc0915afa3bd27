"""The learning rate `train.lr: auto` gives LoRA on a model (MiniLM, or with `--model smollm2` the
bundled SmolLM2): a sweep on validation splits, then the check on the test sets.

Every run: FedLoRA, 4 IID devices (`devices: {reference: 4}`), the modelled clock, and every other
key at its default (rounds, local steps, batch, sequence length, LoRA rank), the learning rate aside.
Two tasks: the AG News sample (`--data DIR`, default data/ag_news: train.csv and test.csv, labels
1-based, text in title and description) and the built-in synthetic topics task (seed 0's training
rows).

The sweep never sees a test set: 800 training rows (a seeded sample) are held out as the validation
split, the devices train on the rest, and a run scores its validation accuracy after the default
rounds.  Every grid value runs with seed 0; the two best (mean over the tasks) run with seeds 1 and
2 as well; the chosen value is the smaller of the two unless the larger's mean over tasks and seeds
is more than one standard error (over seeds) above it.

Then, on the test sets, with lr left at `auto` (what testbed/core/config.py's table gives MiniLM):
the check, only `data` and `devices` given and rounds raised to 10, on the AG News sample (all 1600
test rows, accuracy after every round, the first round at 0.85); and the synthetic task (800 test
rows) after the default rounds.

SmolLM2 (`--model smollm2`): the same, as task causal_lm: each task's rows under a prompt asking
for the topic, answered by a topic word, accuracy by scoring the words (docs/llm.md); a smaller
grid; the check is the AG News test accuracy (800 rows) after the default rounds.  A run takes
about 15 min on 2 quiet cores (5 rounds of 10 steps at batch 16 on 4 devices, then 800 rows
scored): the measured table entry comes from `--model smollm2 --seeds 1` (the grid's four rates on
both tasks with seed 0, then the two checks: about 2.5 h); all three seeds add four runs per seed.

--quick: two rates, seed 0, 1 round of 2 steps, length 32, 200 validation and test rows.
--skip-sweep: only the runs on the test sets (after the table has changed).
`--threads N` sets model.threads in every run (1 on a busy machine): speed only, what is learned
differs at most by rounding.  Full run: about 30 min on 2 quiet cores (a sweep run takes about 80 s).
One line a run on stderr; one JSON object on the last line of stdout.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.core.config import (DataConfig, ExperimentConfig,  # noqa: E402
                                 default_lr, from_dict)
from testbed.data import synthetic_topics  # noqa: E402
from testbed.experiments.run import run_inprocess  # noqa: E402

GRIDS = {"minilm": [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], "smollm2": [5e-4, 1e-3, 2e-3, 4e-3]}
# SmolLM2 answers a prompt with a word (task causal_lm): per task, the prompt over the held-out
# files' `text` column and the words by label id (the synthetic task's first four topics).
LLM_TASKS = {
    "ag_news": ("Classify the topic of this news article as World, Sports, Business or Science.\n"
                "Article: {text}\nTopic:", [" World", " Sports", " Business", " Science"]),
    "synthetic": ("Is this text about politics, sports, business or technology?\nText: {text}\nTopic:",
                  [" politics", " sports", " business", " technology"]),
}
SEEDS = [0, 1, 2]
TARGET, CHECK_ROUNDS = 0.85, 10
DEVICES = {"reference": 4}


def ag_news_rows(folder: Path) -> list[tuple[str, int]]:
    """The sample's training rows as (text, 0-based label), text as testbed joins title and description."""
    with open(folder / "train.csv", newline="") as f:
        return [(f"{r['title']} {r['description']}", int(r["label"]) - 1) for r in csv.DictReader(f)]


def synthetic_rows() -> list[tuple[str, int]]:
    """The training rows a default synthetic run with seed 0 trains on."""
    train, _ = synthetic_topics(DataConfig(), seed=0)
    return list(zip(train.texts, train.labels))


def hold_out(rows: list[tuple[str, int]], n_val: int, folder: Path) -> dict:
    """Write the rows less a seeded sample of `n_val` (tune.csv) and that sample (val.csv); the data
    section of a run that trains on the one and is scored on the other."""
    val = set(random.Random(0).sample(range(len(rows)), n_val))
    folder.mkdir(parents=True, exist_ok=True)
    for name, keep in (("tune", lambda i: i not in val), ("val", lambda i: i in val)):
        with open(folder / f"{name}.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["text", "label"])
            out.writerows(row for i, row in enumerate(rows) if keep(i))
    return {"source": "files", "train_file": str(folder / "tune.csv"), "test_file": str(folder / "val.csv"),
            "text_columns": ["text"], "label_column": "label"}


def run(raw: dict, out: Path, label: str) -> list[float]:
    """One run; the test (or validation) accuracy of each round it evaluated."""
    start = time.perf_counter()
    run_inprocess(from_dict(raw, label), out, quiet=True)
    acc = [r["accuracy"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if r.get("accuracy") is not None]
    print(f"{label:<36} accuracy {' '.join(f'{a:.4f}' for a in acc)}  ({time.perf_counter() - start:.0f} s)",
          file=sys.stderr, flush=True)
    return acc


def sweep(tasks: dict[str, dict], base: dict, grid: list[float], seeds: list[int], out: Path) -> dict:
    """Validation accuracy per task, lr and seed: every lr with the first seed, the best two with all."""
    scores: dict[str, dict[float, list[float]]] = {t: {lr: [] for lr in grid} for t in tasks}

    def runs(lrs: list[float], seed_list: list[int]) -> None:
        for seed in seed_list:
            for lr in lrs:
                for task, data in tasks.items():
                    raw = {**base, "seed": seed, "data": data, "train": {**base.get("train", {}), "lr": lr}}
                    rounds = raw.get("rounds", ExperimentConfig.rounds)
                    acc = run({**raw, "eval_every": rounds}, out / f"{task}-{lr:g}-{seed}",
                              f"val {task} lr {lr:g} seed {seed}")
                    scores[task][lr].append(acc[-1])

    runs(grid, seeds[:1])
    best = sorted(grid, key=lambda lr: (-mean(scores, lr), lr))[:2]
    runs(best, seeds[1:])
    return {"validation": {t: {f"{lr:g}": s for lr, s in by_lr.items()} for t, by_lr in scores.items()},
            "mean": {f"{lr:g}": round(mean(scores, lr), 4) for lr in grid},
            "seeded": [f"{lr:g}" for lr in best], "chosen": choose(scores, best),
            "chosen_per_task": {t: choose({t: scores[t]}, best) for t in tasks}}


def per_seed(scores: dict[str, dict[float, list[float]]], lr: float) -> list[float]:
    """The mean over the tasks of each seed's accuracy."""
    return [statistics.mean(s) for s in zip(*(by_lr[lr] for by_lr in scores.values()))]


def mean(scores: dict[str, dict[float, list[float]]], lr: float) -> float:
    return statistics.mean(per_seed(scores, lr))


def choose(scores: dict[str, dict[float, list[float]]], lrs: list[float]) -> float:
    """The smallest lr whose mean is within one standard error of the best mean: in a tie within
    the noise, the smaller step, farther from the rates at which training falls apart."""
    top = max(lrs, key=lambda lr: mean(scores, lr))
    runs = per_seed(scores, top)
    se = statistics.stdev(runs) / len(runs) ** 0.5 if len(runs) > 1 else 0.0
    return min(lr for lr in lrs if mean(scores, lr) >= mean(scores, top) - se)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="minilm", choices=sorted(GRIDS), help="the model measured (default: minilm)")
    ap.add_argument("--data", default=str(ROOT / "data" / "ag_news"), help="the AG News sample's folder")
    ap.add_argument("--seeds", type=int, default=len(SEEDS),
                    help="seeds of the sweep's best two (default: 3; 1: seed 0 alone, no seeded rerun)")
    ap.add_argument("--threads", type=int, help="model.threads of every run (default: its default)")
    ap.add_argument("--skip-sweep", action="store_true", help="only the test-set runs (after the table changed)")
    ap.add_argument("--out", help="default: bench/results/lr (MiniLM), bench/results/lr-MODEL (others)")
    args = ap.parse_args()
    suffix = "" if args.model == "minilm" else f"-{args.model}"
    agnews, out = Path(args.data), Path(args.out or ROOT / "bench" / "results" / f"lr{suffix}")
    if not (agnews / "train.csv").is_file() or not (agnews / "test.csv").is_file():
        sys.exit(f"bench/lr.py: the AG News sample (train.csv, test.csv) is not in {agnews}; give --data DIR")
    shutil.rmtree(out, ignore_errors=True)  # every run directory afresh
    start = time.perf_counter()
    n_val, n_test = (200, 200) if args.quick else (800, 0)
    llm = args.model != "minilm"
    grid, seeds = ([5e-4, 2e-3], [0]) if args.quick else (GRIDS[args.model], SEEDS[:args.seeds])
    # The defaults; --quick shortens the runs.
    model = {"name": args.model} | ({} if args.threads is None else {"threads": args.threads})
    base: dict = {"devices": DEVICES, "model": model} | ({"task": "causal_lm"} if llm else {})
    if args.quick:
        base |= {"rounds": 1, "model": {**model, "max_length": 32}, "train": {"local_steps": 2}}

    found = {}
    if not args.skip_sweep:
        tasks = {"ag_news": hold_out(ag_news_rows(agnews), n_val, out / "data" / "ag_news"),
                 "synthetic": hold_out(synthetic_rows(), n_val, out / "data" / "synthetic")}
        if llm:
            tasks = {t: {**data, "prompt": LLM_TASKS[t][0], "label_words": LLM_TASKS[t][1]}
                     for t, data in tasks.items()}
        found = sweep(tasks, base, grid, seeds, out)

    auto = default_lr(args.model)
    ag_data = {"source": "files", "train_file": str(agnews / "train.csv"), "test_file": str(agnews / "test.csv"),
               "text_columns": ["title", "description"], "label_column": "label", "label_offset": 1,
               "max_test": n_test or (800 if llm else 0)}
    if llm:
        ag_data |= {"prompt": LLM_TASKS["ag_news"][0].replace("{text}", "{title} {description}"),
                    "label_words": LLM_TASKS["ag_news"][1]}
    rounds = 1 if args.quick else ExperimentConfig.rounds if llm else max(ExperimentConfig.rounds, CHECK_ROUNDS)
    check = run({**base, "rounds": rounds, "data": ag_data}, out / "check", f"check ag_news lr auto ({auto:g})")
    reached = next((r + 1 for r, a in enumerate(check[:CHECK_ROUNDS]) if a >= TARGET), None)
    synthetic = {"synthetic_test": n_test or 800}
    if llm:
        synthetic |= {"prompt": LLM_TASKS["synthetic"][0], "label_words": LLM_TASKS["synthetic"][1]}
    synthetic_test = run({**base, "data": synthetic}, out / "synthetic-test",
                         f"test synthetic lr auto ({auto:g})")

    chosen = f"chosen lr {found['chosen']:g}, " if found else ""
    print(f"{chosen}table (auto) {auto:g}; check: best {max(check):.4f}, {TARGET} "
          + (f"at round {reached}" if reached else f"not reached in {rounds} rounds"), file=sys.stderr)
    print(json.dumps({
        "bench": "lr", "quick": args.quick, "model": args.model, "devices": DEVICES, "grid": grid, "seeds": seeds,
        "validation_rows": n_val, **found, "auto": auto, "auto_is_chosen": auto == found["chosen"] if found else None,
        "check": {"lr": auto, "rounds": rounds, "test_rows": n_test or "all", "accuracy": check,
                  "best": max(check), f"first_round_at_{TARGET}": reached,
                  "at_default_rounds": check[min(ExperimentConfig.rounds, rounds) - 1]},
        "synthetic_test": {"lr": auto, "test_rows": n_test or 800, "accuracy": synthetic_test[-1]},
        "wall_s": round(time.perf_counter() - start)}))


if __name__ == "__main__":
    main()
