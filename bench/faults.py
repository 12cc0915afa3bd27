"""Faults: what a run survives, what it loses, and what it refuses.

Faults, each injected into a real run of a tiny random BERT (2 layers) on synthetic data with
the modelled clock, 3 devices, one agent rank per device under mpirun:
- agent SIGKILL mid-round (after round 0's row, while round 1 trains);
- agent SIGSTOP past the round's deadline (6 s), SIGCONT once the timeout is on record;
- agent out of memory: one device's budget (1 MB) below any plan's footprint;
- aggregator SIGKILL, then `testbed run --resume`: in-process (the testbed process, DropPEFT with
  a personal layer per device), and under mpirun (the whole job: mpirun, aggregator and agents;
  DropPEFT without personal layers, which a distributed run cannot restore).
Per fault: survived (the run finished every round, exit code 0), recorded (summary.json
`failures` holds the fault's kind for its device, or the aggregator's restart), rounds lost
(rounds the finished run lacks), rounds redone (logged after the last checkpoint, run again
after a restart), device-rounds missed (device slots of the finished run left empty),
rejoined (the faulty device took part again in a later round), and state bytes lost: after a
restart, the bytes of global state (LoRA and head) that differ from an uninterrupted run's,
whose metrics must also match but for what the process measured; after an agent fault, the
bytes of global state the final checkpoint lacks or holds as NaN/Inf.
In the emulated lab (as root; skipped, with the reason, elsewhere), deployed with `testbed
deploy` to 3 hosts of 1 CPU: an agent's link set down inside its namespace while round 1
trains (the tiny BERT); an agent killed by its cgroup's OOM killer (FedLoRA's full plan of an
8-layer BERT at length 256 on a host limited to 800 MB; recorded only if the failure's cause
names the OOM killer); and `testbed deploy` SIGKILLed after round 1, then `--resume`,
compared with an uninterrupted deployment.
Malformed messages: the corpus of launch/faults/malformed.py (bad digests, keys, lengths, rounds,
replays, unknown devices, dtypes, NaN/Inf, shapes, layers and ranks beyond the plan), each
answered to a plan over gloo and checked by rank 0's own receiving code and update admission.
Fuzz: the hypothesis strategies of the config and inventory parsers (launch/faults/fuzzing.py), N
examples each; a crash is any outcome but a result or a one-line TestbedError.
--quick: one run per fault, N = 200; full: 3 seeds per fault, N = 3000.
Prints a table, and one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
       "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}

import torch  # noqa: E402
import yaml  # noqa: E402

from launch import lab  # noqa: E402
from launch.cmdline import mpirun_command  # noqa: E402
from launch.faults.inject import kill_job, rank_pids, wait_for  # noqa: E402
from testbed.core.config import from_dict  # noqa: E402
from testbed.experiments.run import run_inprocess  # noqa: E402
from testbed.experiments.runs import read_rows, strip_wall  # noqa: E402
from testbed.model.tiny import save_tiny_bert, tiny_config  # noqa: E402


class Job:
    """One run of a config in its own directory: under mpirun, or the in-process CLI."""

    def __init__(self, folder: Path, raw: dict, agents: int = 0):
        self.raw, self.agents = raw, agents
        self.out = folder / "run"
        self.config = folder / "exp.yaml"
        folder.mkdir(parents=True)
        self.config.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.proc: subprocess.Popen | None = None
        self.stderr = ""

    def command(self, resume: bool = False) -> list[str]:
        if not self.agents:
            where = ["--resume" if resume else "--out", str(self.out)]
            return [sys.executable, "-m", "testbed.cli", "run", str(self.config), *where, "--quiet"]
        if resume:
            return [sys.executable, "-m", "testbed.cli", "run", str(self.config), "--launcher", "mpi",
                    "--agents", str(self.agents), "--resume", str(self.out)]
        return mpirun_command(str(self.config), [], self.out, self.agents)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)

    def finish(self, timeout: float = 600) -> int:
        try:
            self.stderr = self.proc.communicate(timeout=timeout)[1]
        finally:
            if self.proc.poll() is None:
                kill_job(self.proc)
        return self.proc.returncode

    def resume(self) -> int:
        proc = subprocess.run(self.command(resume=True), env=ENV, cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        self.stderr += proc.stderr
        return proc.returncode

    def summary(self) -> dict:
        path = self.out / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {"rounds": 0, "failures": []}

    def checkpoint(self) -> dict | None:
        path = self.out / "checkpoint.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None


def tensors(checkpoint: dict) -> dict[str, torch.Tensor]:
    out = {f"lora.{l}.{n}": t for l, ts in checkpoint["lora"].items() for n, t in ts.items()}
    return out | {f"head.{n}": t for n, t in checkpoint["head"].items()}


def state_bytes_lost(job: Job, reference: dict | None = None) -> int | None:
    """Bytes of global state that the final checkpoint lacks, holds non-finite, or (given an
    uninterrupted run's checkpoint) holds different from it; None if the run never finished
    and there is nothing to compare with."""
    final = job.checkpoint()
    expected = tensors(reference) if reference else None
    if final is None or final["round"] != job.raw["rounds"] - 1:
        return sum(t.numel() * t.element_size() for t in expected.values()) if expected else None
    have = tensors(final)
    lost = 0
    for name, t in (expected or have).items():
        mine = have.get(name)
        bad = mine is None or not torch.isfinite(mine).all() or (expected is not None and not torch.equal(mine, t))
        lost += t.numel() * t.element_size() if bad else 0
    return lost


def outcome(job: Job, code: int, kind: str, device: str, devices: int) -> dict:
    summary, logged = job.summary(), read_rows(job.out)
    faults = [f for f in summary["failures"] if f["kind"] == kind and f["device"] == device]
    first = min((f["round"] for f in faults), default=None)
    later = [r for r in logged if first is not None and r["round"] > first]
    return {"survived": code == 0 and summary["rounds"] == job.raw["rounds"],
            "recorded": bool(faults), "rounds_lost": job.raw["rounds"] - len(logged),
            "rounds_redone": 0, "device_rounds_missed": devices * len(logged) - sum(len(r["devices"]) for r in logged),
            "rejoined": any(device in {d["device"] for d in r["devices"]} for r in later)}


def agent_config(model: str, seed: int, rounds: int, steps: int, **more) -> dict:
    return tiny_config(model, seed=seed, rounds=rounds, devices={"laptop": 3},
                       **{"train.local_steps": steps, "dist.profile": False, **more})


def agent_sigkill(model: str, seed: int, folder: Path) -> dict:
    job = Job(folder, agent_config(model, seed, 3, 200, **{"dist.deadline_s": 120}), agents=3)
    job.start()
    victims = wait_for("agent rank 2", lambda: rank_pids(2), job.proc)
    wait_for("round 0", lambda: read_rows(job.out), job.proc)
    time.sleep(0.2)  # into round 1
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    code = job.finish()
    return outcome(job, code, "crash", "laptop-1", 3) | {"state_bytes_lost": state_bytes_lost(job)}


def agent_sigstop(model: str, seed: int, folder: Path) -> dict:
    job = Job(folder, agent_config(model, seed, 6, 100, **{"dist.deadline_s": 6}), agents=3)
    job.start()
    victims = wait_for("agent rank 2", lambda: rank_pids(2), job.proc)
    wait_for("round 0", lambda: read_rows(job.out), job.proc)
    for pid in victims:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for("the timeout", lambda: any("laptop-1" in r["failures"] for r in read_rows(job.out)), job.proc, 120)
    finally:
        for pid in victims:
            os.kill(pid, signal.SIGCONT)
    code = job.finish()
    return outcome(job, code, "timeout", "laptop-1", 3) | {"state_bytes_lost": state_bytes_lost(job)}


def agent_oom(model: str, seed: int, folder: Path) -> dict:
    raw = tiny_config(model, seed=seed, rounds=2, devices={"laptop": 2, "jetson-tx2": {"count": 1, "memory_mb": 1}},
                      **{"dist.profile": False})
    job = Job(folder, raw, agents=3)
    job.start()
    code = job.finish()
    return outcome(job, code, "oom", "jetson-tx2-0", 3) | {"state_bytes_lost": state_bytes_lost(job)}


def aggregator_kill(model: str, seed: int, folder: Path, agents: int) -> dict:
    """Kill the aggregator (in-process: the testbed process; mpi: the whole job) after round 1,
    resume, and compare with an uninterrupted run of the same config."""
    raw = tiny_config(model, seed=seed, rounds=5, devices={"laptop": 2, "jetson-tx2": 1},
                      **{"strategy.name": "droppeft", "strategy.personal_k": 0 if agents else 1,
                         "strategy.clients_per_round": 2 if agents else 0, "data.partition": "dirichlet",
                         "train.local_steps": 40, "dist.profile": False})
    job = Job(folder / "cut", raw, agents)
    job.start()
    try:
        wait_for("round 1", lambda: len(read_rows(job.out)) >= 2, job.proc)
    finally:
        kill_job(job.proc)
    logged = len(read_rows(job.out))
    saved = job.checkpoint()["round"] + 1
    code = job.resume()
    torch.set_num_threads(1)
    run_inprocess(from_dict(raw), folder / "whole", quiet=True)
    reference = torch.load(folder / "whole" / "checkpoint.pt", weights_only=False)
    return outcome(job, code, "restart", "aggregator", 2 if agents else 3) | {
        "rounds_redone": logged - saved, "rejoined": None, "state_bytes_lost": state_bytes_lost(job, reference),
        "metrics_equal": strip_wall(read_rows(job.out)) == strip_wall(read_rows(folder / "whole"))}


class Deployment(Job):
    """A run deployed with `testbed deploy` to the hosts of an inventory (rank 0 here)."""

    def __init__(self, folder: Path, raw: dict, inventory: Path):
        super().__init__(folder, raw)
        self.inventory = inventory

    def command(self, resume: bool = False) -> list[str]:
        return [sys.executable, "-m", "testbed.cli", "deploy", "-i", str(self.inventory), str(self.config),
                "--resume" if resume else "--out", str(self.out)]


def in_lab(folder: Path, hosts: dict[str, dict], inject: Callable[..., dict]) -> dict:
    """`inject(inventory, lab state)` with a lab of these hosts (1 CPU and 3 GB each unless they
    say) up, in `folder`."""
    subnet = f"10.219.{os.getpid() % 250 + 1}"
    hosts = {h: {"ansible_host": f"{subnet}.{10 + i}", "testbed_cpu": 1.0, "testbed_memory_mb": 3072, **v}
             for i, (h, v) in enumerate(hosts.items())}
    folder.mkdir(parents=True)
    inv = lab.lab_inventory(folder / "lab.yaml", subnet, hosts)
    state = lab.up(lab.lab_spec(inv, f"f{os.getpid() % 10000}", str(folder / "lab")))
    try:
        return inject(inv, state)
    finally:
        lab.down(state)


def lab_link_cut(model: str, seed: int, folder: Path) -> dict:
    """a2's link set down inside its namespace once round 0 is logged, while round 1 trains."""
    def inject(inv: Path, state) -> dict:
        job = Deployment(folder / "run", agent_config(model, seed, 4, 100, **{"dist.deadline_s": 15}), inv)
        job.start()
        wait_for("round 0", lambda: read_rows(job.out), job.proc, 300)
        lab.ip(state.host("a2").netns, "link", "set", "tb0", "down")
        code = job.finish()
        return outcome(job, code, "timeout", "a2", 3) | {"state_bytes_lost": state_bytes_lost(job)}

    return in_lab(folder / "lab", {"a1": {}, "a2": {}, "a3": {}}, inject)


def lab_cgroup_oom(seed: int, folder: Path) -> dict:
    """FedLoRA's full plan on a host whose cgroup holds 800 MB: an 8-layer BERT read at length 256
    needs about 1.3 GB, so the kernel kills the agent in round 0 (see tests/test_lab_deploy.py)."""
    model = save_tiny_bert(folder / "attention-bert", hidden=64, layers=8, heads=4, intermediate=256, positions=256)

    def inject(inv: Path, state) -> dict:
        raw = tiny_config(model, seed=seed, rounds=2, **{"model.max_length": 256, "train.batch_size": 16,
                                                         "train.local_steps": 2, "dist.profile": False})
        job = Deployment(folder / "run", raw, inv)
        job.start()
        code = job.finish()
        result = outcome(job, code, "crash", "tight", 2)
        causes = [f.get("cause", "") for f in job.summary()["failures"] if f["device"] == "tight"]
        return result | {"recorded": result["recorded"] and any("OOM killer" in c for c in causes),
                         "state_bytes_lost": state_bytes_lost(job)}

    return in_lab(folder / "lab", {"roomy": {}, "tight": {"testbed_memory_mb": 800}}, inject)


def deploy_kill(model: str, seed: int, folder: Path) -> dict:
    """SIGKILL to `testbed deploy` after round 1 (its rank 0 dies with it; the hosts keep their
    ranks), `--resume`, and compare with an uninterrupted deployment."""
    def inject(inv: Path, state) -> dict:
        raw = agent_config(model, seed, 5, 40)
        whole = Deployment(folder / "whole", raw, inv)
        whole.start()
        whole.finish()
        job = Deployment(folder / "cut", raw, inv)
        job.start()
        try:
            wait_for("round 1", lambda: len(read_rows(job.out)) >= 2, job.proc, 300)
        finally:
            job.proc.kill()
            job.proc.wait()
        logged, saved = len(read_rows(job.out)), job.checkpoint()["round"] + 1
        code = job.resume()
        return outcome(job, code, "restart", "aggregator", 3) | {
            "rounds_redone": logged - saved, "rejoined": None,
            "state_bytes_lost": state_bytes_lost(job, whole.checkpoint()),
            "metrics_equal": strip_wall(read_rows(job.out)) == strip_wall(read_rows(whole.out))}

    return in_lab(folder / "lab", {"a1": {}, "a2": {}, "a3": {}}, inject)


FAULTS = {
    "agent SIGKILL mid-round": ("mpi", agent_sigkill),
    "agent SIGSTOP past the deadline": ("mpi", agent_sigstop),
    "agent out of memory": ("mpi", agent_oom),
    "aggregator SIGKILL + resume": ("inprocess", lambda m, s, f: aggregator_kill(m, s, f, 0)),
    "aggregator job SIGKILL + resume": ("mpi", lambda m, s, f: aggregator_kill(m, s, f, 2)),
}
LAB_FAULTS = {
    "agent link cut": ("lab", lab_link_cut),
    "agent OOM-killed by its cgroup": ("lab", lambda m, s, f: lab_cgroup_oom(s, f)),
    "deploy SIGKILL + deploy --resume": ("lab", deploy_kill),
}


def run_faults(model: str, seeds: list[int], folder: Path, faults: dict) -> list[dict]:
    table = []
    for name, (transport, inject) in faults.items():
        results = []
        for seed in seeds:
            start = time.perf_counter()
            results.append(inject(model, seed, folder / f"{name.replace(' ', '-')}-{seed}"))
            print(f"  {name} (seed {seed}): {results[-1]} [{time.perf_counter() - start:.0f} s]", file=sys.stderr)
        rejoin = [r["rejoined"] for r in results if r["rejoined"] is not None]
        table.append({"fault": name, "transport": transport, "injected": len(results),
                      "survived": sum(r["survived"] for r in results),
                      "recorded": sum(r["recorded"] for r in results),
                      "rounds_lost": sum(r["rounds_lost"] for r in results),
                      "rounds_redone": sum(r["rounds_redone"] for r in results),
                      "device_rounds_missed": sum(r["device_rounds_missed"] for r in results),
                      "rejoined": sum(rejoin) if rejoin else None,
                      "state_bytes_lost": total([r["state_bytes_lost"] for r in results]),
                      "metrics_equal": all(r.get("metrics_equal", True) for r in results)
                      if any("metrics_equal" in r for r in results) else None})
    return table


def total(values: list[int | None]) -> int | None:
    return None if None in values else sum(values)


def run_malformed() -> dict:
    from launch.faults.malformed import run_corpus

    lines, log = run_corpus()
    bad = lines[1:]  # the first is the honest control
    by_stage = {}
    for l in bad:
        stage = by_stage.setdefault(l["stage"], {"tried": 0, "rejected": 0})
        stage["tried"] += 1
        stage["rejected"] += l["rejected"]
    return {"tried": len(bad), "rejected": sum(l["rejected"] for l in bad),
            "logged": sum(l["rejected"] and l["reason"] in log for l in bad),
            "control_admitted": not lines[0]["rejected"], "by_stage": by_stage,
            "accepted": [l["case"] for l in bad if not l["rejected"]]}


def run_fuzz(examples: int, folder: Path) -> dict:
    from hypothesis import HealthCheck, given, settings

    from launch.faults import fuzzing as fz

    targets = {"config mappings": (fz.config_mappings, fz.check_mapping),
               "config sections": (fz.config_sections, fz.check_mapping),
               "config files + overrides": (fz.config_texts, lambda x: fz.check_config_text(folder, x)),
               "config YAML documents": (fz.config_mappings, lambda x: fz.check_yaml_document(folder, x)),
               "inventories (YAML, INI, JSON)": (fz.inventory_texts, lambda x: fz.check_inventory(folder, x))}
    out = {}
    for name, (strategy, check) in targets.items():
        counts = {"tried": 0, "crashes": 0, "first_crash": None}

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(example):
            counts["tried"] += 1
            try:
                check(example)
            except Exception as exc:  # the count is the point: any exception here is a crash
                counts["crashes"] += 1
                counts["first_crash"] = counts["first_crash"] or f"{example!r:.200}: {exc!r:.200}"

        start = time.perf_counter()
        one()
        out[name] = counts | {"seconds": round(time.perf_counter() - start, 1)}
        print(f"  fuzz {name}: {out[name]}", file=sys.stderr)
    return out


def print_tables(faults: list[dict], malformed: dict, fuzz: dict) -> None:
    cols = ["fault", "transport", "injected", "survived", "recorded", "rounds_lost", "rounds_redone",
            "device_rounds_missed", "rejoined", "state_bytes_lost", "metrics_equal"]
    heads = ["fault", "transport", "injected", "survived", "recorded", "rounds lost", "rounds redone",
             "device-rounds missed", "rejoined", "state bytes lost", "metrics = uninterrupted"]
    cells = [[("-" if r[c] is None else str(r[c])) for c in cols] for r in faults]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    stages = ", ".join(f"{s}: {v['rejected']}/{v['tried']}" for s, v in malformed["by_stage"].items())
    print(f"\nmalformed messages: {malformed['tried']} tried, {malformed['rejected']} rejected ({stages}), "
          f"{malformed['logged']} logged with their reason; the honest control "
          f"{'admitted' if malformed['control_admitted'] else 'REJECTED'}")
    print("fuzzed inputs:")
    for name, f in fuzz.items():
        print(f"  {name:<32} {f['tried']:>6} tried  {f['crashes']} crashes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one run per fault, 200 fuzz examples per parser")
    args = ap.parse_args()
    seeds, examples = ([0], 200) if args.quick else ([0, 1, 2], 3000)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        folder = Path(tmp)
        model = save_tiny_bert(folder / "tiny-bert")
        faults = run_faults(model, seeds, folder / "runs", FAULTS)
        if no_lab := lab.unavailable():
            print(f"  lab faults skipped: {no_lab}", file=sys.stderr)
        else:
            faults += run_faults(model, seeds, folder / "lab-runs", LAB_FAULTS)
        malformed = run_malformed()
        fuzz = run_fuzz(examples, folder)
    print_tables(faults, malformed, fuzz)
    print(json.dumps({"faults": faults, "malformed": malformed, "fuzz": fuzz, "seeds": seeds,
                      "fuzz_examples": examples, "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
