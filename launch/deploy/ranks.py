"""The ranks of a deployed run, each one `python -m launch.mpi` process: rank 0 here (LocalRank)
or any rank on a host (RemoteRank).  Both are started, polled, stopped and asked why they died
the same way, and stream their output into their log as it comes."""
from __future__ import annotations

import ctypes
import os
import posixpath
import shlex
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Callable

import paramiko

from launch.deploy.hosts import (STOP_GRACE_S, Session, memory_state,
                                 stop_rank_in)
from launch.deploy.payload import ROOT
from launch.remote import stop_group

PR_SET_PDEATHSIG = 1  # prctl(2)
LIBC = ctypes.CDLL(None)  # loaded here: a child between fork and exec must not load libraries
AGENTS_GRACE_S = 15.0  # after rank 0 ends, for agents to act on its goodbye


class Rank(ABC):
    """One started launch.mpi process."""

    def __init__(self, number: int, name: str, log: Path):
        self.number = number
        self.name = name  # the host, or "here"
        self.log = log
        self.pump: threading.Thread | None = None

    @abstractmethod
    def poll(self) -> int | None:
        """Its exit status (-1: killed by a signal, or its connection was lost), None while it runs."""

    @abstractmethod
    def stop(self) -> bool:
        """SIGTERM to its process group, then SIGKILL; whether it is gone."""

    def cause(self) -> str:
        """Why it died, where its host can say; "" otherwise."""
        return ""

    def stream(self, read: Callable[[int], bytes], echo: IO[bytes] | None) -> None:
        self.pump = threading.Thread(target=pump, args=(read, self.log, echo), daemon=True)
        self.pump.start()

    def end_output(self) -> None:
        """Wait (a little) for the last of its output to reach the log."""
        if self.pump is not None:
            self.pump.join(timeout=5)


class LocalRank(Rank):
    """Rank 0 here, in its own process group, which the kernel kills if deploy dies."""

    def __init__(self, proc: subprocess.Popen, log: Path):
        super().__init__(0, "here", log)
        self.proc = proc

    @classmethod
    def start(cls, config: Path, secret_file: Path, out: Path, resume: bool, env: dict[str, str],
              log: Path) -> LocalRank:
        path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
        proc = subprocess.Popen([sys.executable, "-m", "launch.mpi", str(config), "--resume" if resume else "--out",
                                 str(out)], cwd=ROOT, preexec_fn=die_with_parent,
                                env={**os.environ, **env, "RANK": "0", "TESTBED_SECRET_FILE": str(secret_file),
                                     "PYTHONPATH": path},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # Ctrl-C reaches us only: we stop it in order
        rank = cls(proc, log)
        rank.stream(lambda n: proc.stdout.read1(n), sys.stderr.buffer)
        return rank

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> bool:
        return stop_group(self.proc.pid, STOP_GRACE_S, lambda: self.proc.poll() is not None)


class RemoteRank(Rank):
    """A rank on a host, started in its run directory as its own process group (whose id the
    host keeps in rank.pid, for the host-side stop)."""

    def __init__(self, session: Session, number: int, chan: paramiko.Channel, log: Path):
        super().__init__(number, session.host.name, log)
        self.session = session
        self.chan = chan

    @classmethod
    def start(cls, s: Session, number: int, env: dict[str, str], log: Path, echo: bool = False,
              resume: bool = False) -> RemoteRank:
        variables = {**env, "RANK": str(number), "TESTBED_SECRET_FILE": posixpath.join(s.run_dir, "secret")}
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())
        command = (f"cd {shlex.quote(s.run_dir)} && echo $$ > rank.pid && export {exports} && "
                   f"exec {shlex.quote(s.python)} -m launch.mpi config.yaml {'--resume' if resume else '--out'} run")
        chan = s.client.get_transport().open_session(timeout=30)
        chan.set_combine_stderr(True)
        chan.exec_command(command)
        chan.shutdown_write()
        rank = cls(s, number, chan, log)
        rank.stream(chan.recv, sys.stderr.buffer if echo else None)
        return rank

    def poll(self) -> int | None:
        if self.chan.exit_status_ready():
            return self.chan.exit_status  # -1: killed by a signal, or closed without a status
        return None if self.chan.get_transport().is_active() else -1  # the connection is lost

    def stop(self) -> bool:
        return stop_rank_in(self.session, self.session.run_dir) == "stopped"

    def cause(self) -> str:
        """The OOM killer, if it fired in the host's memory cgroup since the run started."""
        s = self.session
        now = memory_state(s) if s.memory else None
        if now is None or now[0] <= s.memory[0]:
            return ""
        return f"the kernel's OOM killer fired in its memory cgroup (limit {now[1]:.0f} MiB)"


def die_with_parent() -> None:
    """In the child, before exec: the kernel kills it if deploy dies (Linux), as a controller
    that crashed takes its rank 0 with it; the run is then continued with --resume."""
    if hasattr(LIBC, "prctl"):
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def pump(read: Callable[[int], bytes], log: Path, echo: IO[bytes] | None) -> None:
    """Copy a rank's output into its log (and to our stderr) as it comes."""
    with open(log, "ab") as f:
        while data := read(65536):
            f.write(data)
            f.flush()
            if echo is not None:
                echo.write(data)
                echo.flush()


def wait(ranks: list[Rank], causes: dict[str, str]) -> int:
    """Rank 0's exit status, once it is out; agents that end badly are reported as they do, with
    their cause where the host knows it (kept in `causes`, by host)."""
    reported: set[int] = set()

    def report() -> None:
        for r in ranks[1:]:
            code = r.poll()
            if code not in (None, 0) and r.number not in reported:
                reported.add(r.number)
                why = causes[r.name] = r.cause()
                print(f"testbed: {r.name}: agent (rank {r.number}) exited with status {code}"
                      f"{': ' + why if why else ''}; see {r.log}", file=sys.stderr)

    while (code := ranks[0].poll()) is None:
        report()
        time.sleep(0.2)
    deadline = time.monotonic() + AGENTS_GRACE_S
    while any(r.poll() is None for r in ranks[1:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    report()
    return code
