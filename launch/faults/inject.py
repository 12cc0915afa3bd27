"""Fault injection into a running job: find a rank's processes, wait for a moment, kill the job."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def mpi_processes() -> Iterator[tuple[int, bytes, bytes]]:
    """(pid, command line, environment) of each `launch.mpi` process on this machine."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"launch.mpi" in cmd:
            yield int(pid), cmd, env


def rank_pids(rank: int) -> list[int]:
    """The processes of one rank of a `launch.mpi` job under Open MPI."""
    return [pid for pid, _, env in mpi_processes() if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env.split(b"\0")]


def wait_for(what: str, ready: Callable[[], T], proc: subprocess.Popen, timeout: float = 120) -> T:
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
