"""The cores a process may use and the threads auto takes, read from cgroup trees built here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import lab
from testbed.measure.cgroups import cgroup_dirs
from testbed.measure.cores import (CpuLoad, cpu_load, cpu_quota, machine_cpus,
                                   runnable_others)
from tests.helpers import ROOT, lab_test


def tree(root: Path, cgroup: str, files: dict[str, str], stat: str = "") -> Path:
    """A filesystem root holding /proc/self/cgroup, /proc/stat and the cgroup files given (paths
    below /sys/fs/cgroup)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/stat").write_text(stat)
    for path, text in files.items():
        (root / "sys/fs/cgroup" / path).parent.mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup" / path).write_text(text)
    return root


V1 = "4:memory:/job\n3:cpu,cpuacct:/lab/host\n0::/\n"


def test_a_v1_quota_is_its_cgroups_least_and_none_is_no_quota(tmp_path):
    root = tree(tmp_path, V1, {"cpu/lab/host/cpu.cfs_quota_us": "25000\n", "cpu/lab/host/cpu.cfs_period_us": "100000\n",
                               "cpu/lab/cpu.cfs_quota_us": "150000\n", "cpu/lab/cpu.cfs_period_us": "100000\n",
                               "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_dirs("cpu", root) == [root / "sys/fs/cgroup/cpu/lab/host", root / "sys/fs/cgroup/cpu/lab",
                                        root / "sys/fs/cgroup/cpu"]
    assert cpu_quota(root) == 0.25
    (root / "sys/fs/cgroup/cpu/lab/host/cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(root) == 1.5  # the parent's
    (root / "sys/fs/cgroup/cpu/lab/cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(root) is None


def test_a_v2_quota_is_read_from_cpu_max(tmp_path):
    root = tree(tmp_path, "0::/user.slice/job.scope\n", {"user.slice/job.scope/cpu.max": "max 100000\n",
                                                        "user.slice/cpu.max": "150000 100000\n",
                                                        "cgroup.controllers": "cpu memory\n"})
    assert cpu_quota(root) == 1.5
    (root / "sys/fs/cgroup/user.slice/cpu.max").write_text("max 100000\n")
    assert cpu_quota(root) is None


def test_without_a_cpu_cgroup_there_is_no_quota(tmp_path):
    assert cpu_quota(tree(tmp_path, "4:memory:/job\n", {})) is None  # v1 without the cpu controller
    assert cpu_quota(tmp_path / "nothing") is None  # no /proc at all


def test_the_others_runnable_threads_leave_out_the_reader_and_cpus_are_counted_from_proc_stat(tmp_path):
    stat = "cpu  1 2 3\ncpu0 1 2 3\ncpu1 1 2 3\ncpu2 1 2 3\nctxt 9\nprocs_running 4\nprocs_blocked 0\n"
    root = tree(tmp_path, V1, {}, stat)
    assert runnable_others(root, sample_s=0) == 3
    assert machine_cpus(root) == 3
    (root / "proc/stat").write_text(stat.replace("procs_running 4", "procs_running 1"))
    assert runnable_others(root, sample_s=0) == 0


@pytest.mark.parametrize("cores, quota, others, free, oversubscribed", [
    (2, None, 0.05, 2, {1: False, 2: False}),  # quiet
    (2, None, 1.0, 1, {1: False, 2: True}),  # one busy process: one core left
    (2, None, 5.0, 1, {1: True, 2: True}),  # a busy machine: still one thread, and the warning
    (2, 0.25, 0.0, 1, {1: False, 2: True}),  # a quarter of a CPU keeps one thread busy
    (2, 1.5, 0.0, 2, {1: False, 2: False}),  # a quota is rounded up
    (2, 1.0, 1.0, 1, {1: False, 2: True}),  # a quota of one CPU, and the other CPU is taken: no contention
    (8, None, 2.4, 6, {6: False, 7: True}),  # to the nearest whole core
])
def test_auto_takes_the_usable_cores_the_others_leave_and_at_least_one(cores, quota, others, free, oversubscribed):
    load = CpuLoad(cores, quota, others)
    assert load.free == free
    assert {t: load.oversubscribed(t) for t in oversubscribed} == oversubscribed


def test_the_load_seen_at_start_puts_the_others_share_on_this_processs_cpus(tmp_path):
    cores = len(os.sched_getaffinity(0))
    stat = "".join(f"cpu{i} 1 2 3\n" for i in range(2 * cores)) + f"procs_running {1 + 2 * cores}\n"
    root = tree(tmp_path, V1, {"cpu/lab/host/cpu.cfs_quota_us": "50000", "cpu/lab/host/cpu.cfs_period_us": "100000"},
                stat)
    # 2 x cores busy threads over twice this process's CPUs: cores of them on its own
    assert cpu_load(root, sample_s=0) == CpuLoad(cores, 0.5, float(cores))


PROBE = """
import json
from testbed.measure.cores import cpu_load
load = cpu_load(sample_s=0)
print(json.dumps([load.quota, load.usable]))
"""


@lab_test
def test_a_process_in_a_cpu_cgroup_reads_its_quota():
    cgroup = lab.CGROUPS / "cpu" / f"tb-test-{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "cpu.cfs_period_us").write_text("100000")
        (cgroup / "cpu.cfs_quota_us").write_text("50000")
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             preexec_fn=lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))).stdout
        assert json.loads(out) == [0.5, 1]
    finally:
        cgroup.rmdir()
