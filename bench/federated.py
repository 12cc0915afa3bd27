"""Centralised vs federated (IID, Dirichlet 0.5) on the AG News sample at equal samples seen.

Full: MiniLM, 4 clients x 10 local steps x batch 16, 12 rounds, lr 2e-3, sequence length 64,
800 test rows (the centralised run takes 40 steps a round on all the data).  --quick: 2 rounds, length 32,
5 steps, 200 test rows.  Prints one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.core.config import load_config  # noqa: E402
from testbed.experiments.run import run_inprocess  # noqa: E402

DATA = ROOT / "data" / "ag_news"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "federated"))
    args = ap.parse_args()
    clients, steps = 4, (5 if args.quick else 10)
    common = [f"data.train_file={DATA / 'train.csv'}", f"data.test_file={DATA / 'test.csv'}",
              f"rounds={2 if args.quick else 12}", f"train.local_steps={steps}", "train.lr=2e-3",
              f"model.max_length={32 if args.quick else 64}", f"data.max_test={200 if args.quick else 800}",
              "devices={}", "target_accuracy=0.85"]
    variants = {
        "centralised": [f"devices.reference={1}", f"train.local_steps={clients * steps}"],
        "federated_iid": [f"devices.reference={clients}", "data.partition=iid"],
        "federated_dirichlet_0.5": [f"devices.reference={clients}", "data.partition=dirichlet", "data.alpha=0.5"],
    }
    results = {}
    for name, sets in variants.items():
        cfg = load_config(ROOT / "examples" / "agnews.yaml", common + sets)
        start = time.perf_counter()
        summary = run_inprocess(cfg, Path(args.out) / name, quiet=True, force=True)  # replaces the last results
        results[name] = {"final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
                         "samples_seen": cfg.rounds * cfg.train.local_steps * cfg.train.batch_size
                         * sum(d.count for d in cfg.devices.values()),
                         "wall_s": round(time.perf_counter() - start, 1)}
        print(f"{name:<26} final {summary['final_accuracy']:.4f}  best {summary['best_accuracy']:.4f}  "
              f"({results[name]['wall_s']} s)", file=sys.stderr)
    gap = results["centralised"]["final_accuracy"] - results["federated_iid"]["final_accuracy"]
    print(json.dumps({"bench": "federated", "quick": args.quick, "results": results,
                      "iid_gap_to_centralised_points": round(100 * gap, 2)}))


if __name__ == "__main__":
    main()
