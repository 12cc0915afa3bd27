"""LEGEND, HetLoRA and FlexLoRA against FedLoRA on the methods' study (bench/study.py).

Full: 12 rounds x 8 local steps x batch 16, length 48, 400 test rows, 8 Jetson-class devices,
Dirichlet 0.5, modelled clock, target accuracy 0.8.  --quick: 4 rounds x 6 steps, length 32,
target 0.4.  Prints one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from study import ROOT, compare, run, study_sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = ROOT / "bench" / "results" / ("legend-quick" if args.quick else "legend")
    sets = study_sets(args.quick)
    results = {name: run(name, sets + [f"strategy.name={name}"], Path(out))
               for name in ["fedlora", "legend", "hetlora", "flexlora"]}
    print(json.dumps({"bench": "legend", "quick": args.quick, "results": results, "vs_fedlora": compare(results)}))


if __name__ == "__main__":
    main()
