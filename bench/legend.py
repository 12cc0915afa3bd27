"""LEGEND, HetLoRA and FlexLoRA against FedLoRA on the methods' study (bench/study.py).

Full: 12 rounds x 8 local steps x batch 16, length 48, 400 test rows, 8 Jetson-class devices,
Dirichlet 0.5, modelled clock, target accuracy 0.8.  --quick: 4 rounds x 6 steps, length 32,
target 0.4.  --study DIR: no runs; the same comparison, per split over the study's seeds,
from the `testbed compare` study in DIR (`make bench` passes the study it has just run, which
holds these four methods).  Prints one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from study import ROOT, compare, from_study, run, study_sets

METHODS = ["fedlora", "legend", "hetlora", "flexlora"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--study", type=Path, help="read the comparison from this study's report instead of running it")
    args = ap.parse_args()
    if args.study:
        print(json.dumps({"bench": "legend", "study": str(args.study), "by_setting": from_study(args.study, METHODS)}))
        return
    out = ROOT / "bench" / "results" / ("legend-quick" if args.quick else "legend")
    sets = study_sets(args.quick)
    results = {name: run(name, sets + [f"strategy.name={name}"], Path(out))
               for name in METHODS}
    print(json.dumps({"bench": "legend", "quick": args.quick, "results": results, "vs_fedlora": compare(results)}))


if __name__ == "__main__":
    main()
