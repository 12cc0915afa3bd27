"""What an agent measures of its memory, and the training budget rank 0 draws from it."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

from launch import lab
from testbed.comm.join import memory_from_dict
from testbed.comm.wire import WireError
from testbed.measure.memory import (MemoryMeasure, SavedTensorCounter,
                                    join_memory, memory_limit_mb, peak_mb,
                                    peak_rss_mb)
from tests.helpers import ROOT, build, lab_test


def test_the_budget_keeps_the_estimated_peak_inside_the_limit_with_a_margin():
    m = MemoryMeasure(limit_mb=1000, base_mb=400, other_mb=10, peak_mb=700, counted_mb=160)
    # RSS grew 300 MB for 150 MB counted: 2 MB a counted MB; 900 - 400 MB left for 2 x (budget - 10)
    assert m.budget_mb() == pytest.approx(260)
    assert m.budget_mb(margin=0.2) == pytest.approx(210)
    assert MemoryMeasure(limit_mb=1000, base_mb=400).budget_mb() is None  # not profiled: no budget
    # RSS that grew less than the count (memory already in use) never inflates the budget
    assert MemoryMeasure(1000, 400, 10, 450, 160).budget_mb() == pytest.approx(10 + 500)
    assert MemoryMeasure(300, 400, 10, 700, 160).budget_mb() == 0.0  # nothing left


def test_on_the_cpu_an_agent_measures_the_hosts_memory():
    cpu = torch.device("cpu")
    assert join_memory(cpu).limit_mb == memory_limit_mb() and join_memory(cpu).base_mb > 0
    assert peak_mb(cpu) == pytest.approx(peak_rss_mb(), abs=1.0)


@pytest.mark.parametrize("raw", [{"limit_mb": -1, "base_mb": 0}, {"limit_mb": "big", "base_mb": 0},
                                 {"limit_mb": 1, "base_mb": 1, "swap": 3}, [1, 2], {"base_mb": 1}])
def test_a_malformed_memory_report_is_refused_naming_its_rank(raw):
    with pytest.raises(WireError, match="rank 3's memory"):
        memory_from_dict(raw, "rank 3's memory")


PROBE = """
import json, sys
from testbed.measure.memory import memory_limit_mb, oom_kills
if sys.argv[1] == "grow":
    hog = [bytearray(1 << 20) for _ in range(400)]  # past the limit: the OOM killer ends it here
print(json.dumps([memory_limit_mb(), oom_kills()]))
"""


@lab_test
def test_a_process_reads_its_cgroup_limit_and_a_kill_by_the_oom_killer_is_counted(tmp_path):
    cgroup = lab.CGROUPS / "memory" / f"tb-test-{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(200 << 20))
        if (cgroup / "memory.memsw.limit_in_bytes").exists():
            (cgroup / "memory.memsw.limit_in_bytes").write_text(str(200 << 20))

        def run(what: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", PROBE, what], cwd=ROOT, capture_output=True, text=True,
                                  preexec_fn=lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())))

        limit, kills = json.loads(run("read").stdout)
        assert limit == 200 and kills == 0
        assert run("grow").returncode == -9  # SIGKILL, from the kernel
        assert json.loads(run("read").stdout) == [200, 1]
    finally:
        cgroup.rmdir()


def test_counting_a_forward_that_never_runs_backward_frees_its_graph():
    """Measuring saved activations (measure_activations) runs forward passes and no backward: the
    counter's hooks must not keep their graphs alive (a study running one cell after another grew
    by the model's size each cell)."""
    bb, _ = build("bert")
    ids = torch.randint(5, 90, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    bb.model.train().requires_grad_(True)

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    before = live()
    for _ in range(3):
        with SavedTensorCounter(bb.model) as counter:
            bb.model(**inputs).loss
        assert counter.bytes > 0
    assert live() == before
