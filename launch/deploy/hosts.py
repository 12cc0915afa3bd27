"""A checked host (Session) and what deploy does on it through launch.remote, which is sent on
stdin for every call (see launch/remote.py for why): its memory state, stopping what runs in a
run directory, fetching a remote aggregator's run and removing a run directory."""
from __future__ import annotations

import json
import posixpath
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import paramiko

from launch import remote
from launch.inventory import Host
from launch.ssh import HostProblem, Result, get_tree, run, where
from testbed.core.errors import TestbedError

REMOTE = Path(remote.__file__).read_text()
STOP_GRACE_S = 5.0


@dataclass
class Session:
    """A connected host whose interpreter has what an agent needs."""

    host: Host
    client: paramiko.SSHClient
    python: str
    base: str  # absolute {testbed_workdir}/{host}
    run_dir: str = ""  # base/{run name}, once made
    memory: tuple[int, float] | None = None  # OOM kills so far and memory limit (MiB) as its rank sees them


def host_command(client: paramiko.SSHClient, python: str, command: str, args: list[str],
                 timeout: float = 60.0) -> Result:
    """`python - COMMAND ARGS` with launch/remote.py on stdin (so it needs no quoting, nor the project)."""
    return run(client, " ".join([shlex.quote(python), "-", command, *map(shlex.quote, args)]), stdin=REMOTE,
               timeout=timeout)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def parallel(fn: Callable[[Session], Any], sessions: list[Session]) -> list[Any]:
    """fn on every session at once; a HostProblem becomes one error naming the host."""
    def one(s: Session) -> Any:
        try:
            return fn(s)
        except (HostProblem, OSError, paramiko.SSHException) as exc:
            raise TestbedError(f"{where(s.host)}: {exc}") from None

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(sessions)))) as pool:
        return list(pool.map(one, sessions))


def memory_state(s: Session) -> tuple[int, float] | None:
    """The host's count of OOM kills (in the memory cgroup its processes start in) and its
    memory limit; None where that cannot be read."""
    res = host_command(s.client, s.python, "memory", [s.run_dir])
    try:
        kills, limit = json.loads(last_line(res.output))
        return int(kills), float(limit)
    except (ValueError, TypeError):
        return None


def stop_rank_in(s: Session, run_dir: str) -> str:
    """Stop the rank started in `run_dir`, if one was; what the host said: `stopped`, or why not."""
    res = host_command(s.client, s.python, "stop", [run_dir, str(STOP_GRACE_S)], timeout=60)
    return last_line(res.output)


def fetch_run(s: Session, out: Path, run_dir: str = "") -> None:
    """The remote aggregator's run directory (in `run_dir`, default its session's), as far as it got."""
    remote_run = posixpath.join(run_dir or s.run_dir, "run")
    with s.client.open_sftp() as sftp:
        try:
            sftp.stat(remote_run)
        except FileNotFoundError:
            return
        get_tree(sftp, remote_run, out)


def remove_run(s: Session, run_dir: str) -> None:
    run(s.client, f"rm -rf -- {shlex.quote(run_dir)}", timeout=60)


def clear_leftover(s: Session, out: Path, aggregator: bool) -> None:
    """--resume: stop what is left of the run on the host (a deploy that was killed leaves its
    ranks and run directory) and remove it; an aggregator host's run state is fetched first,
    since it is newer than what was copied back here, if anything was."""
    run_dir = posixpath.join(s.base, out.name)
    said = stop_rank_in(s, run_dir)
    if said != "stopped":
        raise HostProblem(f"what is left of the run in {run_dir} did not stop: {said}")
    if aggregator:
        fetch_run(s, out, run_dir)
    remove_run(s, run_dir)
