"""Fault injection into a running job: find a rank's processes, wait for rounds, kill the job."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def rank_pids(rank: int) -> list[int]:
    """The processes of one rank of a `launch.mpi` job under Open MPI."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"launch.mpi" in cmd and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            found.append(int(pid))
    return found


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


def wait_for(what: str, ready, proc: subprocess.Popen, timeout: float = 120):
    """Poll `ready()` until it returns something true; fail if the job ends or time runs out."""
    deadline = time.monotonic() + timeout
    while not (found := ready()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: never happened (job exit code {proc.poll()})")
        time.sleep(0.05)
    return found


def kill_job(proc: subprocess.Popen) -> int:
    """SIGKILL every process of a job started with start_new_session=True: mpirun and all ranks
    (Open MPI puts each rank in a process group of its own, but they share mpirun's session)."""
    sid = proc.pid
    victims = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.getsid(int(pid)) == sid:
                victims.append(int(pid))
        except OSError:
            continue
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return len(victims)
