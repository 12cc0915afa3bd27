"""Half precision on a GPU: MiniLM LoRA step time and memory at fp32, bf16 and fp16, with a
quarter, half and all of its layers.

- Each precision runs with the frozen base in the matching dtype (`train.precision: bf16` with
  `model.dtype: bfloat16`, fp16 with float16): the configuration that saves memory.  A precision
  the device cannot autocast to is reported with the reason, not measured.
- A plan keeps the top k layers (k = a quarter, half, all of MiniLM's 6, at least 1), LoRA r=8 on
  each (query, value), batch 16, length 64; the project's trainer times `steps` steps after a
  warm-up step (the median), counts the training footprint, and on CUDA reads the peak memory
  torch allocated and reserved in those steps.
- Without a CUDA device it prints one JSON line saying so, unless `--device cpu` asks for the
  same figures on the CPU (slow: minutes even at --quick).

Full: 10 steps a figure.  --quick: 3.  One JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.agent.trainer import train_plan  # noqa: E402
from testbed.core.config import load_config  # noqa: E402
from testbed.core.errors import TestbedError  # noqa: E402
from testbed.core.plan import Plan  # noqa: E402
from testbed.experiments.setup import setup  # noqa: E402
from testbed.measure.memory import (peak_cuda_mb, peak_cuda_reserved_mb,  # noqa: E402
                                    reset_peak_cuda)
from testbed.model.lora import get_head, init_lora  # noqa: E402
from testbed.model.placement import describe, resolve_device  # noqa: E402

DEMO = ROOT / "examples" / "quickstart.yaml"
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # precision: the base's dtype
FRACTIONS = {"quarter": 0.25, "half": 0.5, "all": 1.0}


def figures(device: str, precision: str, steps: int, threads: int) -> dict:
    """Per fraction of layers: step seconds, counted footprint, CUDA peaks."""
    try:
        cfg = load_config(DEMO, [f"model.device={device}", f"train.precision={precision}",
                                 f"model.dtype={PRECISIONS[precision]}", "model.max_length=64",
                                 f"model.threads={threads}"])
        exp = setup(cfg)
    except TestbedError as exc:
        return {"skipped": str(exc)}
    n = exp.info.num_layers
    out = {}
    for name, fraction in FRACTIONS.items():
        kept = list(range(n - max(1, round(n * fraction)), n))
        lora, head = init_lora(exp.info, kept, 8, seed=0), get_head(exp.bb)

        def run(k: int):
            plan = Plan(ranks=dict.fromkeys(kept, 8), layers=kept, local_steps=k, batch_size=16, lr=1e-3)
            return train_plan(exp.bb, plan, lora, head, exp.data.train, list(range(len(exp.data.train))),
                              cfg.model.lora, cfg.train, seed=0)

        run(1)  # warm-up: kernels chosen, buffers allocated
        reset_peak_cuda(exp.bb.placement.device)
        res = run(steps)
        out[name] = {"layers": len(kept), "step_s": round(res.step_s, 4), "footprint_mb": round(res.footprint_mb, 1),
                     "peak_cuda_mb": round(peak_cuda_mb(exp.bb.placement.device), 1),
                     "peak_cuda_reserved_mb": peak_cuda_reserved_mb(exp.bb.placement.device)}
        print(f"  {precision} {name}: {out[name]}", file=sys.stderr)
    return out


def against_fp32(results: dict) -> dict:
    """Each half precision's step time and footprint as a fraction of fp32's, mean over the fractions."""
    base = results["fp32"]
    ratios = {}
    for precision, by_fraction in results.items():
        if precision == "fp32" or "skipped" in by_fraction:
            continue
        ratios[precision] = {key: round(statistics.fmean(by_fraction[f][key] / base[f][key] for f in FRACTIONS), 3)
                             for key in ("step_s", "footprint_mb")}
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 steps a figure")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu to take the same figures on the CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (model.threads; 0 = auto)")
    args = ap.parse_args()
    result: dict = {"bench": "gpu", "quick": args.quick, "torch": torch.__version__}
    try:
        device = resolve_device(args.device, "--device")
    except TestbedError as exc:
        print(json.dumps({**result, "measured": False, "reason": str(exc)}))
        return
    start = time.perf_counter()
    result.update(device=describe(device), measured=True)
    results = {}
    for p in PRECISIONS:
        results[p] = figures(args.device, p, 3 if args.quick else 10, args.threads)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # else the last precision's cached blocks count as the next one's reserved
    result.update(results=results, vs_fp32=against_fp32(results), wall_s=round(time.perf_counter() - start, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
