"""`testbed deploy` into the shipped emulated lab: deployment overhead and two end-to-end runs.

Brings up inventory/lab-emulated.yaml (4 hosts: the aggregator, 1 CPU, and agents of 1, 0.5 and
0.25 CPU behind 200, 50 and 20 Mbit/s links) and deploys LEGEND on MiniLM and the AG News sample,
on the wall clock (plans follow the profiles the agents measure when they join):
  - `startup`: 1 round without the agents' profiling (`dist.profile: false`): start-up alone;
  - `clean`: 3 rounds;
  - `cut`: the same, with orin-nano-01's link set down inside its namespace once the first
    round is done; the run must finish without it and report it in `failures`.
The lab is torn down afterwards, also on failure.  Needs root.
Memory (a lab of its own, 2 hosts of 1 CPU: `roomy`, 3 GB, and `tight`, whose cgroup holds
800 MB): 2 rounds of each method on an 8-layer BERT of hidden 64 read at length 256, batch 16,
whose full plan needs about 1.3 GB of RSS; agents measure their memory when they join and
rank 0 plans within it.  Reported per method: the tight host's LoRA layers, cap on the layers
a step runs (DropPEFT) and peak RSS per round, and its failures (an OOM kill names the OOM
killer).  --quick: legend and fedlora only.

Reported per run: seconds from starting `testbed deploy` to the hosts checked, the project
pushed, every rank started, and the first round starting (the first metrics row's arrival
minus that round's own wall seconds); the whole run; accuracy, failures and each round's
per-device LoRA depth.  --quick: 2 rounds of 4 local steps.  One JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from launch import lab  # noqa: E402
from launch.inventory import load_inventory  # noqa: E402

INVENTORY = ROOT / "inventory" / "lab-emulated.yaml"
CUT = "orin-nano-01"
STAGES = {"checked": ": ready (", "pushed": "testbed: pushed", "started": "testbed: started rank 0"}


def config(tmp: Path, quick: bool, profile: bool = True, rounds: int = 0) -> Path:
    raw = yaml.safe_load((ROOT / "examples" / "agnews.yaml").read_text())
    raw.update(rounds=rounds or (2 if quick else 3), clock="wall", strategy={"name": "legend"})
    raw["train"]["local_steps"] = 4 if quick else 10
    raw["dist"] = {"deadline_s": 90, "profile": profile}  # the cut host is given up on after the deadline
    path = tmp / f"legend-lab-{'profile' if profile else 'noprofile'}-{raw['rounds']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def remote_metrics(name: str) -> Path:
    """Where the aggregator host writes the run's metrics (the lab's hosts share this file system)."""
    agg = next(h for h in load_inventory(INVENTORY) if h.role == "aggregator")
    return Path(agg.workdir) / agg.name / name / "run" / "metrics.jsonl"


def deploy(cfg: Path, out: Path, cut: str | None) -> dict:
    """One deployment; `cut`: the namespace whose link goes down after the first round."""
    start = time.monotonic()
    seen: dict[str, float] = {}
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "deploy", "-i", str(INVENTORY), str(cfg),
                             "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            for stage, mark in STAGES.items():
                if mark in line:
                    seen[stage] = time.monotonic() - start  # the last host's line for "checked"

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    metrics, first_row = remote_metrics(out.name), None
    while proc.poll() is None:
        if first_row is None and metrics.is_file() and metrics.read_text().strip():
            first_row = time.monotonic() - start, json.loads(metrics.read_text().splitlines()[0])
            if cut:
                lab.ip(cut, "link", "set", "tb0", "down")  # the host's end of its only link
        time.sleep(0.1)
    reader.join(timeout=10)
    total = time.monotonic() - start
    if proc.returncode != 0 or first_row is None:
        raise SystemExit(f"bench/deploy.py: deploy failed ({proc.returncode}): {''.join(lines[-20:])}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    arrived, row0 = first_row
    return {"checked_s": round(seen["checked"], 1), "pushed_s": round(seen["pushed"], 1),
            "started_s": round(seen["started"], 1), "first_round_s": round(arrived - row0["wall_s"], 1),
            "total_s": round(total, 1), "rounds": summary["rounds"], "final_accuracy": summary["final_accuracy"],
            "failures": [(f["round"], f["device"], f["kind"]) for f in summary["failures"]],
            "depth": [{d["device"]: d["layers"] for d in r["devices"]} for r in rows],
            "warnings": [line.strip() for line in lines if "warning" in line]}


def memory(folder: Path, methods: list[str]) -> dict:
    from faults import Deployment, in_lab

    from testbed.model.tiny import save_tiny_bert, tiny_config

    model = save_tiny_bert(folder / "attention-bert", hidden=64, layers=8, heads=4, intermediate=256, positions=256)

    def inject(inv: Path, state) -> dict:
        out = {}
        for method in methods:
            raw = tiny_config(model, rounds=2, strategy={"name": method},
                              **{"model.max_length": 256, "train.batch_size": 16, "train.local_steps": 2})
            job = Deployment(folder / method, raw, inv)
            job.start()
            code = job.finish()
            rows = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines()]
            tight = [next((d for d in r["devices"] if d["device"] == "tight"), None) for r in rows]
            out[method] = {"exit": code, "tight_layers": [d and d["layers"] for d in tight],
                           "tight_max_active": [d and d.get("max_active") for d in tight],
                           "tight_peak_rss_mb": [d and round(d["peak_rss_mb"], 1) for d in tight],
                           "tight_failures": [(f["round"], f["kind"], f.get("cause", "")) for f in
                                              job.summary()["failures"] if f["device"] == "tight"]}
            print(f"  memory {method}: {out[method]}", file=sys.stderr)
        return out

    return in_lab(folder / "lab", {"roomy": {}, "tight": {"testbed_memory_mb": 800}}, inject)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if reason := (os.geteuid() != 0 and "needs root") or lab.missing_tool():
        print(json.dumps({"bench": "deploy", "skipped": str(reason)}))
        return
    os.chdir(ROOT)  # the shipped inventory's lab lives in .lab/ here
    state = lab.up(lab.lab_spec(INVENTORY))
    try:
        with tempfile.TemporaryDirectory(prefix="tb-deploy-bench-") as tmp:
            cfg, tmp = config(Path(tmp), args.quick), Path(tmp)
            runs = {"startup": deploy(config(tmp, args.quick, profile=False, rounds=1), tmp / "startup", None),
                    "clean": deploy(cfg, tmp / "clean", None),
                    "cut": deploy(cfg, tmp / "cut", state.host(CUT).netns)}
    finally:
        lab.down(state)
    methods = ["legend", "fedlora"] if args.quick else ["legend", "fedpruner", "droppeft", "adaptive", "fedlora"]
    with tempfile.TemporaryDirectory(prefix="tb-deploy-memory-") as tmp:
        limited = memory(Path(tmp), methods)
    print(json.dumps({"bench": "deploy", "quick": args.quick, "hosts": 4, "model": "minilm",
                      "strategy": "legend", "cut": CUT, **runs, "memory": limited}))


if __name__ == "__main__":
    main()
