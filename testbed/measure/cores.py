"""The CPU cores this process may use and how many of them other processes want: from these, the
torch threads a run takes when `model.threads` is 0 (auto), and whether the CPU is oversubscribed.

torch's threads work in lockstep: an operation ends with its slowest thread, so one thread that
shares a core with a busy process holds all the others up, and a step slows far more than the
core it lost (see bench/threads.py).  Auto therefore takes only the cores nobody else wants.

Everything but the affinity is read below `root`, the filesystem's root unless a test hands it a
tree of its own.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.measure.cgroups import ROOT, cgroup_dirs


@dataclass(frozen=True)
class CpuLoad:
    """What the process saw of the CPU when it started."""

    cores: int  # CPUs this process may run on (its affinity)
    quota: float | None  # the least CPU quota of its cgroups, in CPUs; None: no quota
    others: float  # runnable threads of other processes on those CPUs, on average over a short sample

    @property
    def usable(self) -> int:
        """Cores this process may keep busy: its CPUs, capped by the quota (rounded up, as a quota
        of 1.5 CPUs keeps 2 threads busy three quarters of the time)."""
        return max(1, min(self.cores, math.ceil(self.quota))) if self.quota else self.cores

    def _spare(self) -> int:
        """Usable cores the other processes leave, to the nearest whole core (may be 0 or less)."""
        return min(self.usable, math.floor(self.cores - self.others + 0.5))

    @property
    def free(self) -> int:
        """The threads auto takes: the cores left to this process, at least one."""
        return max(1, self._spare())

    def oversubscribed(self, threads: int) -> bool:
        """Whether `threads` busy threads of this process and the others' want more than the cores."""
        return threads > self._spare()


def cpu_quota(root: Path = ROOT) -> float | None:
    """The least CPU quota of this process's cgroups (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), in CPUs."""
    quotas = [q for d in cgroup_dirs("cpu", root) if (q := _quota(d))]
    return min(quotas, default=None)


def _quota(d: Path) -> float | None:
    try:
        if (d / "cpu.max").is_file():  # v2: "QUOTA PERIOD", or "max PERIOD" for none
            quota, period = (d / "cpu.max").read_text().split()
        else:  # v1: a quota of -1 for none
            quota, period = ((d / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        return int(quota) / int(period) if quota != "max" and int(quota) > 0 else None
    except (OSError, ValueError):  # no CPU controller here, or a file of another kind
        return None


def runnable_others(root: Path = ROOT, sample_s: float = 0.5, reads: int = 10) -> float:
    """Runnable threads of other processes on the machine, on average over `sample_s` seconds:
    the kernel's `procs_running`, less the thread reading it.  0 where /proc/stat is not."""
    counts = []
    for i in range(reads):
        if i:
            time.sleep(sample_s / (reads - 1))
        try:
            line = next(x for x in (root / "proc/stat").read_text().splitlines() if x.startswith("procs_running "))
        except (OSError, StopIteration):
            return 0.0
        counts.append(int(line.split()[1]) - 1)
    return max(sum(counts) / len(counts), 0.0)


def machine_cpus(root: Path = ROOT) -> int:
    """CPUs online on the machine: the `cpuN` lines of /proc/stat (else os.cpu_count())."""
    try:
        lines = (root / "proc/stat").read_text().splitlines()
    except OSError:
        return os.cpu_count() or 1
    return sum(1 for x in lines if x.startswith("cpu") and x[3:4].isdigit()) or os.cpu_count() or 1


def cpu_load(root: Path = ROOT, sample_s: float = 0.5) -> CpuLoad:
    """The CPU as this process finds it now (takes `sample_s` seconds)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # the others' threads spread over the machine's CPUs: those of ours get their share
    others = runnable_others(root, sample_s) * min(cores / machine_cpus(root), 1.0)
    return CpuLoad(cores, cpu_quota(root), others)
