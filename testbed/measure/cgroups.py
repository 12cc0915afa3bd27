"""The cgroups this process is in, for the limits they set (memory, CPU quota).

Everything is read below `root`, the filesystem's root unless a test hands it a tree of its own.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path("/")


def cgroup_dirs(controller: str, root: Path = ROOT) -> list[Path]:
    """This process's cgroup directories for `controller` ("memory", "cpu"), v1 or v2, its own
    first, then its ancestors' up to the hierarchy's top."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    mounts = root / "sys/fs/cgroup"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            top = mounts / controller  # v1: one hierarchy per controller ("cpu" links to "cpu,cpuacct")
            break
    else:  # v2: one hierarchy, the line "0::/path"
        path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
        if path is None:
            return []
        top = mounts
    own = top / path.lstrip("/")
    return [d for d in [own, *own.parents] if d.is_relative_to(top) and d.is_dir()]
