"""A run directory, taken for a run's life: one process at a time, and never a run written over
another (docs/cli.md, "The run directory").

The lock is an flock on `.lock` in the directory: the kernel releases it when its holder ends,
however it ends, so a lock left by a killed run is free for the next one without any check of
whether its holder still lives. The file keeps the last holder's PID, to name it in a refusal."""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from testbed.core.config import (ExperimentConfig, check_same_experiment,
                                 first_difference, to_dict)
from testbed.core.errors import TestbedError
from testbed.server.checkpoint import load_checkpoint

LOCK = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "profiles")  # what --force removes


class RunDir:
    """A run directory this process holds, as a context manager: `with RunDir.take(...)`."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    @classmethod
    def take(cls, out: Path, cfg: ExperimentConfig, resume: bool = False, force: bool = False) -> RunDir:
        """Lock `out` (made if need be) for a fresh run of `cfg`, or to resume the run it holds.
        A fresh run is refused over an existing one unless `force`, which removes that run's
        files; a resume is refused unless the directory's config and checkpoint are this run's
        and `cfg.rounds` does not go below the rounds done."""
        if resume:  # before the lock, which would make the directory
            check_same_experiment(cfg, out / "config.yaml")
        run = cls(out, lock(out))
        try:
            if resume:
                check_checkpoint(out, cfg)
            elif existing := [f for f in RUN_FILES if (out / f).exists()]:
                if not force:
                    raise TestbedError(f"{out} holds a run already ({', '.join(existing)}): continue it with "
                                       f"--resume {out} in place of --out, or replace it with --force")
                remove_run(out, existing)
        except BaseException:
            run.release()
            raise
        return run

    def release(self) -> None:
        os.close(self.fd)  # closing the file releases its flock

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(out: Path) -> int:
    """The file descriptor holding `out`'s lock; refused, naming the holder, if another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()  # empty while the holder is writing it
        os.close(fd)
        who = f"process {holder}" if holder else "another process"
        raise TestbedError(f"{out}: in use by {who} (a run, or a resume of it); wait for it to end, or stop "
                           f"it") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def check_checkpoint(out: Path, cfg: ExperimentConfig) -> None:
    """`out`'s checkpoint is of the experiment `cfg` describes, and `cfg` runs at least its rounds."""
    c = load_checkpoint(out)
    if c.config is not None and (key := first_difference({**c.config, "rounds": cfg.rounds}, to_dict(cfg))):
        raise TestbedError(f"--resume: {out / 'checkpoint.pt'} is another experiment's (its {key} differs from "
                           f"{out / 'config.yaml'}); start afresh with --force --out {out}")
    if cfg.rounds < c.round + 1:
        raise TestbedError(f"--resume: rounds {cfg.rounds} is below the {c.round + 1} rounds {out} has done "
                           f"(a resume may only extend a run)")


def remove_run(out: Path, files: list[str]) -> None:
    for name in files:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
