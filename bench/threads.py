"""torch threads under contention: MiniLM LoRA step time at 1 and 2 threads, and the demo's wall
time with the old default (`model.threads: 2`) and the new one (0, auto), quiet and loaded.

- step: MiniLM with LoRA r=8 on every layer (query, value), batch 16, length 64, a training step
  of the project's trainer on the synthetic task; the median of `steps` steps after a warm-up.
- demo: `testbed run examples/quickstart.yaml` in a process of its own, timed from start to end
  (as `make demo` minus installing); --quick: `--set rounds=1`.
- loaded: two busy-loop processes of the benchmark's own beside it; quiet: nothing else runs.
  Quiet figures are only taken when the machine is: before them the benchmark waits (up to
  --quiet-wait seconds) for other processes to want less than half a core for 30 s, and otherwise
  reports them as not taken, with the load it saw; `quiet_disturbed` names the quiet figures
  before which other work had started.  Every figure carries the load seen just before it:
  the 1-minute load average and the runnable threads of other processes (the busy loops
  included), as testbed.measure.cores samples them.

Full: 8 steps per figure, the 5-round demo with a 20 min cap per run, 5 min of waiting for
quiet (under 60 min).  --quick: 2 steps, the 1-round demo with a 60 s cap per run, 30 s of
waiting (under 5 min).  A run past its cap is reported as `over_s` (a lower bound), with the
rounds it finished.
One JSON object on the last line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.agent.trainer import train_plan  # noqa: E402
from testbed.core.config import load_config  # noqa: E402
from testbed.core.plan import Plan  # noqa: E402
from testbed.experiments.setup import setup  # noqa: E402
from testbed.measure.cores import cpu_load  # noqa: E402
from testbed.model.lora import init_lora  # noqa: E402

DEMO = ROOT / "examples" / "quickstart.yaml"
QUIET = 0.5  # runnable threads of other processes below which the machine counts as quiet


def load_seen() -> dict:
    load = cpu_load()
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "others_runnable": round(load.others, 2),
            "auto_threads": load.free}


@contextlib.contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """`n` processes spinning on a core each, for as long as the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1.0)  # started and spinning before anything is measured
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def wait_for_quiet(limit_s: float, samples: int = 3) -> tuple[bool, dict]:
    """Whether the machine became quiet within `limit_s` seconds (quiet in `samples` samples in a
    row, 10 s apart: one can fall between two bursts of a busy process), and the load last seen."""
    deadline = time.monotonic() + limit_s
    in_a_row = 0
    while True:
        seen = load_seen()
        in_a_row = in_a_row + 1 if seen["others_runnable"] < QUIET else 0
        if in_a_row == samples or time.monotonic() >= deadline:
            return in_a_row == samples, seen
        print(f"waiting for a quiet machine: {seen}", file=sys.stderr)
        time.sleep(10)


class Steps:
    """MiniLM with LoRA on every layer, ready to time training steps."""

    def __init__(self) -> None:
        cfg = load_config(DEMO, ["model.threads=1", "model.max_length=64"])
        self.exp = setup(cfg)
        layers = list(range(self.exp.info.num_layers))
        self.lora = init_lora(self.exp.info, layers, 8, seed=0)
        self.head = {k: p.detach().clone() for k, p in self.exp.bb.head_params().items()}
        self.cfg = cfg

    def step_s(self, threads: int, steps: int) -> float:
        torch.set_num_threads(threads)
        train = self.exp.data.train
        plan = Plan(ranks=dict.fromkeys(self.lora, 8), local_steps=steps, batch_size=16)
        run = lambda n: train_plan(self.exp.bb, Plan(**{**plan.__dict__, "local_steps": n}), self.lora, self.head,
                                   train, list(range(len(train))), self.cfg.model.lora, self.cfg.train, seed=0)
        run(1)  # warm-up: this thread count's kernels and buffers
        return run(steps).step_s


def step_figures(steps: Steps, n: int) -> dict:
    out = {}
    for threads in (1, 2):
        seen = load_seen()
        out[f"threads_{threads}"] = {"step_s": round(steps.step_s(threads, n), 3), **seen}
        print(f"  step at {threads} threads: {out[f'threads_{threads}']}", file=sys.stderr)
    return out


def demo_s(threads: str, quick: bool, cap_s: float) -> dict:
    """Wall seconds of the demo run with `model.threads` at `threads` ("" = the default)."""
    seen = load_seen()
    sets = (["--set", f"model.threads={threads}"] if threads else []) + (["--set", "rounds=1"] if quick else [])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "testbed.cli", "run", str(DEMO), "--out", f"{tmp}/run", "--quiet", *sets]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap_s,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
        except subprocess.TimeoutExpired:
            rows = Path(tmp, "run", "metrics.jsonl")
            done = len(rows.read_text().splitlines()) if rows.is_file() else 0
            return {"wall_s": None, "over_s": cap_s, "rounds_done": done, **seen}
    if proc.returncode:
        sys.exit(f"bench/threads.py: the demo failed:\n{proc.stderr[-3000:]}")
    warned = any("oversubscribed" in line for line in proc.stderr.splitlines())
    return {"wall_s": round(time.perf_counter() - start, 1), "warned": warned, **seen}


def demo_figures(quick: bool, cap_s: float) -> dict:
    out = {}
    for name, threads in (("old_default_threads_2", "2"), ("new_default_auto", "")):
        out[name] = demo_s(threads, quick, cap_s)
        print(f"  demo, {name}: {out[name]}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 steps a figure, the 1-round demo (under 5 min)")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="seconds to wait for a quiet machine before the quiet figures (default 300; --quick 30)")
    args = ap.parse_args()
    n, cap_s = (2, 60.0) if args.quick else (8, 1200.0)
    wait_s = args.quiet_wait if args.quiet_wait is not None else (30.0 if args.quick else 300.0)
    start = time.perf_counter()
    result: dict = {"bench": "threads", "quick": args.quick, "cpus": len(os.sched_getaffinity(0)),
                    "busy_loops_when_loaded": 2}
    steps = Steps()
    print("loaded (2 busy loops):", file=sys.stderr)
    with busy_loops(2):
        result["loaded"] = {"step": step_figures(steps, n), "demo": demo_figures(args.quick, cap_s)}
    quiet, seen = wait_for_quiet(wait_s)
    if quiet:
        print("quiet:", file=sys.stderr)
        result["quiet"] = {"step": step_figures(steps, n), "demo": demo_figures(args.quick, cap_s)}
        disturbed = [f"{part}.{name}" for part, figures in result["quiet"].items() for name, f in figures.items()
                     if f["others_runnable"] >= QUIET]
        if disturbed:  # other work started meanwhile: these figures are not quiet ones
            result["quiet_disturbed"] = disturbed
    else:
        result["quiet"] = None
        result["quiet_not_taken"] = f"the machine was not quiet within {wait_s:.0f} s: {seen}"
        print(result["quiet_not_taken"], file=sys.stderr)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
