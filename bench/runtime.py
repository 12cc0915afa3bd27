"""The dist runtime under mpirun: overhead per round and bytes on the wire.

Full: MiniLM on the AG News sample, 4 agent ranks + the aggregator (5 ranks, one thread each,
oversubscribed on 2 cores), 4 devices, 4 rounds x 10 local steps x batch 16, length 64,
evaluation only after the last round (so rounds measure the runtime, not evaluation).
--quick: 2 rounds x 4 steps, length 32.

- overhead = (round wall time - slowest agent's local compute) / round wall time, median;
- wire efficiency = bytes sent / bytes of the LoRA and head tensors that had to travel.
Prints one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "ag_news"

from launch.cmdline import mpirun_command  # noqa: E402
from testbed.core.config import load_config  # noqa: E402


def lora_and_head_bytes(cfg, hidden: int = 384, labels: int = 4, layers: int = 6) -> int:
    """Tensor bytes one plan or update of this job must carry (float32 or the wire dtype)."""
    itemsize = 4 if cfg.wire.dtype == "float32" else 2
    lora = layers * 2 * 2 * cfg.model.lora.rank * hidden
    return (lora + labels * hidden + labels) * itemsize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--agents", type=int, default=4)
    args = ap.parse_args()
    rounds, steps, length = (2, 4, 32) if args.quick else (4, 10, 64)
    sets = [f"data.train_file={DATA / 'train.csv'}", f"data.test_file={DATA / 'test.csv'}", f"rounds={rounds}",
            f"eval_every={rounds}", f"train.local_steps={steps}", f"model.max_length={length}",
            f"devices={{reference: {args.agents}}}", "dist.threads=1", "clock=wall"]
    cfg = load_config(ROOT / "examples" / "agnews.yaml", sets)
    out = ROOT / "bench" / "results" / "runtime"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cmd = mpirun_command(str(ROOT / "examples" / "agnews.yaml"), sets, out, args.agents)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench/runtime.py: mpirun failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    overhead = [(r["train_wall_s"] - max(d["wall_s"] for d in r["devices"])) / r["train_wall_s"] for r in rows]
    wire = sum(r["bytes_up"] + r["bytes_down"] for r in rows)
    tensors = sum(2 * len(r["devices"]) * lora_and_head_bytes(cfg) for r in rows)
    for r, o in zip(rows, overhead):
        print(f"round {r['round']}: wall {r['train_wall_s']:.2f} s, slowest agent "
              f"{max(d['wall_s'] for d in r['devices']):.2f} s, overhead {100 * o:.2f} %", file=sys.stderr)
    print(json.dumps({"bench": "runtime", "quick": args.quick, "agents": args.agents, "rounds": rounds,
                      "overhead_per_round": [round(o, 4) for o in overhead],
                      "overhead_median": round(statistics.median(overhead), 4),
                      "wire_bytes": wire, "tensor_bytes": tensors, "wire_efficiency": round(wire / tensors, 4)}))


if __name__ == "__main__":
    main()
