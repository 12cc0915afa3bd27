"""Does the emulated lab's CPU quota slow a device as a slower device would be slow?

Brings up a two-host lab (`quarter`: 0.25 CPU, `whole`: 1 CPU; 3 GB each), runs
`testbed profile --model minilm --threads 1 --ranks 8` inside each host over SSH, one host after
the other, and compares the measured per-layer seconds of a training step (forward with LoRA
plus backward, at rank 8): a quota of a quarter CPU should make each layer about 4x slower.
The lab is torn down afterwards, also on failure.  Needs root (namespaces and cgroups).
--quick: batch 8 x 32 tokens instead of 16 x 64.  One JSON object on the last line.

Other processes on this machine compete for its CPUs: they can slow the 1-CPU host (which then
gets less than its quota allows) more than the quarter host, which never gets more than a
quarter; contention therefore pulls the ratio below 4.  `cpu_received` says how much of a CPU
each host got on average while it profiled (CPU seconds of the profiler over wall seconds,
start-up included).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from launch import lab  # noqa: E402

HOSTS = {"quarter": 0.25, "whole": 1.0}
INVENTORY = """all:
  vars:
    testbed_lab_subnet: 10.78.0.0/24
    ansible_user: root
    testbed_memory_mb: 3072
    testbed_bandwidth_mbit: 1000
  hosts:
    quarter: {ansible_host: 10.78.0.10, testbed_cpu: 0.25}
    whole: {ansible_host: 10.78.0.11, testbed_cpu: 1.0}
"""


def profile_on(state: lab.LabState, host: str, quick: bool) -> tuple[dict, float]:
    """The host's profile, and the share of a CPU it got on average while profiling."""
    size = "--batch 8 --seq-len 32" if quick else ""
    # `times` prints the CPU seconds of the shell's children: the profiler's
    cmd = (f"bash -c 'cd {ROOT} && HF_HUB_OFFLINE=1 {sys.executable} -m testbed.cli profile --model minilm "
           f"--threads 1 --ranks 8 {size} && times >&2'")
    start = time.perf_counter()
    rc, out, err = lab.run_on(state, host, cmd)
    wall = time.perf_counter() - start
    if rc:
        raise SystemExit(f"bench/lab.py: profiling on {host} failed: {err.strip().splitlines()[-1:]}")
    user, system = (minutes_seconds(t) for t in err.strip().splitlines()[-1].split())
    print(f"{host}: {(user + system) / wall:.2f} CPU on average over {wall:.1f} s", file=sys.stderr)
    return json.loads(out), (user + system) / wall


def minutes_seconds(text: str) -> float:
    minutes, seconds = text.rstrip("s").split("m")
    return 60 * float(minutes) + float(seconds)


def layer_seconds(profile: dict) -> list[float]:
    return [f + b for f, b in zip(profile["forward_lora_s"]["8"], profile["backward_s"]["8"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if reason := (os.geteuid() != 0 and "needs root") or lab.missing_tool():
        print(json.dumps({"bench": "lab", "skipped": str(reason)}))
        return
    with tempfile.TemporaryDirectory(prefix="tb-lab-bench-") as tmp:
        (Path(tmp) / "bench.yaml").write_text(INVENTORY)
        state = lab.up(lab.lab_spec(Path(tmp) / "bench.yaml", "tbbench", str(Path(tmp) / "lab")))
        try:
            measured = {host: profile_on(state, host, args.quick) for host in HOSTS}
        finally:
            lab.down(state)
    profiles = {host: p for host, (p, _) in measured.items()}
    per_layer = {host: layer_seconds(p) for host, p in profiles.items()}
    ratios = [q / w for q, w in zip(per_layer["quarter"], per_layer["whole"])]
    step = {host: sum(s) for host, s in per_layer.items()}
    print(json.dumps({"bench": "lab", "quick": args.quick, "cpu": HOSTS, "period_us": lab.PERIOD_US,
                      "batch": profiles["whole"]["batch_size"], "seq_len": profiles["whole"]["seq_len"],
                      "layer_s": {h: [round(s, 5) for s in v] for h, v in per_layer.items()},
                      "layer_ratio": [round(r, 2) for r in ratios],
                      "median_layer_ratio": round(statistics.median(ratios), 2),
                      "all_layers_ratio": round(step["quarter"] / step["whole"], 2),
                      "cpu_received": {host: round(share, 2) for host, (_, share) in measured.items()}}))


if __name__ == "__main__":
    main()
