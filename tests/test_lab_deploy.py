"""`testbed deploy` into the emulated lab (root, cgroup v1): hosts are network namespaces with
their own sshd, CPU quota, memory limit and link, which the deployment cannot tell from a real lab."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import lab
from testbed.experiments.runs import read_rows
from testbed.model.tiny import save_tiny_bert, tiny_config
from tests.helpers import (ENV, ROOT, lab_test, leftovers, run_processes,
                           write_config)

# this test run's own subnets and lab names, so that another lab on the machine does not clash
SUBNET, SUBNET_CPU, SUBNET_MEM = (f"10.{n}.{os.getpid() % 250 + 1}" for n in (216, 217, 218))
NAME = f"d{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory) -> str:
    """A 4-layer random BERT whose layers take tens of milliseconds: long against the lab's 10 ms
    CFS period, so that a CPU quota shows in every measured layer."""
    return save_tiny_bert(tmp_path_factory.mktemp("small-bert"), hidden=256, layers=4, heads=4, intermediate=1024)


def deploy(inv: Path, config: Path, out: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "testbed.cli", "deploy", "-i", str(inv), str(config), "--out", str(out)]
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@lab_test
def test_lab_up_deploy_two_fedlora_rounds_on_three_hosts_lab_down_leaves_nothing(tiny_bert, tmp_path):
    hosts = {f"h{i}": {"ansible_host": f"{SUBNET}.{10 + i}", "testbed_cpu": 1.0} for i in (1, 2, 3)}
    inv = lab.lab_inventory(tmp_path / "lab.yaml", SUBNET, hosts)
    state = lab.up(lab.lab_spec(inv, NAME, str(tmp_path / "lab")))
    try:
        out = tmp_path / "runs" / "ci"
        proc = deploy(inv, write_config(tmp_path, tiny_config(tiny_bert, **{"dist.profile": False})), out)
        sshd = list(state.pids.values())
    finally:
        lab.down(state)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fedlora" and summary["rounds"] == 2 and summary["failures"] == []
    assert [sorted(d["device"] for d in r["devices"]) for r in read_rows(out)] == [["h1", "h2", "h3"]] * 2
    for h in hosts:
        assert f"serves {h}" in (out / "agents" / f"{h}.log").read_text()
    assert leftovers(state, sshd) == []  # namespaces, links, cgroups, sshd, the lab's files
    assert not run_processes(str(tmp_path))  # no rank of the run, here or in the lab


@lab_test
def test_on_the_wall_clock_legend_gives_a_quarter_cpu_host_a_lighter_plan_than_a_whole_cpu_host(small_bert, tmp_path):
    """Both hosts are of the same class: only what their agents measure under their quotas differs."""
    hosts = {"quarter": {"ansible_host": f"{SUBNET_CPU}.10", "testbed_cpu": 0.25},
             "whole": {"ansible_host": f"{SUBNET_CPU}.11", "testbed_cpu": 1.0}}
    for h in hosts.values():
        h["testbed_profile"] = "reference"
    inv = lab.lab_inventory(tmp_path / "lab.yaml", SUBNET_CPU, hosts)
    cfg = tiny_config(small_bert, rounds=1, clock="wall", strategy={"name": "legend", "deadline_device": "fastest"},
                      **{"model.max_length": 64, "train.batch_size": 16})
    state = lab.up(lab.lab_spec(inv, f"{NAME}c", str(tmp_path / "lab")))
    try:
        out = tmp_path / "runs" / "cpu"
        proc = deploy(inv, write_config(tmp_path, cfg), out)
    finally:
        lab.down(state)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = {h: yaml.safe_load((out / "profiles" / f"rank-{rank}.yaml").read_text())
                for rank, h in ((1, "quarter"), (2, "whole"))}
    step = {h: sum(p["forward_frozen_s"]) + sum(p["backward_s"][min(p["backward_s"])]) for h, p in measured.items()}
    assert step["quarter"] > 2 * step["whole"], step
    (row,) = read_rows(out)
    depth = {d["device"]: d["layers"] for d in row["devices"]}
    assert depth["quarter"] < depth["whole"], depth


@pytest.fixture(scope="module")
def attention_bert(tmp_path_factory) -> str:
    """An 8-layer BERT of hidden 64 read at length 256: its attention maps make a layer's saved
    activations tens of MB at little compute, so depth decides whether a step fits 800 MB."""
    return save_tiny_bert(tmp_path_factory.mktemp("attention-bert"), hidden=64, layers=8, heads=4, intermediate=256,
                          positions=256)


@lab_test
def test_a_memory_limited_host_gets_a_plan_that_fits_while_fedlora_is_killed_by_its_cgroup(attention_bert, tmp_path):
    """Both hosts are of one class, and the counted footprint of the full plan (about 500 MB) is
    within both configured budgets (testbed_memory_mb): only what their agents measure under
    their cgroup limits tells them apart.  LEGEND plans within the tight host's limit, and
    DropPEFT caps the layers a step runs there; FedLoRA's full plan (about 1.3 GB of RSS) is
    killed there by the kernel, and the run records it."""
    hosts = {"roomy": {"ansible_host": f"{SUBNET_MEM}.10", "testbed_memory_mb": 3072},
             "tight": {"ansible_host": f"{SUBNET_MEM}.11", "testbed_memory_mb": 800}}
    for h in hosts.values():
        h.update(testbed_profile="reference", testbed_cpu=1.0)
    inv = lab.lab_inventory(tmp_path / "lab.yaml", SUBNET_MEM, hosts)
    base = {"rounds": 1, "model.max_length": 256, "train.batch_size": 16, "train.local_steps": 2}
    state = lab.up(lab.lab_spec(inv, f"{NAME}m", str(tmp_path / "lab")))
    try:
        runs = {}
        for method in ("legend", "droppeft", "fedlora"):
            cfg = tiny_config(attention_bert, strategy={"name": method}, **base)
            runs[method] = (tmp_path / "runs" / method,
                            deploy(inv, write_config(tmp_path, cfg), tmp_path / "runs" / method))
    finally:
        lab.down(state)
    out, proc = runs["legend"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["failures"] == []
    depth = {d["device"]: d["layers"] for d in read_rows(out)[0]["devices"]}
    assert depth["tight"] < depth["roomy"] == 8, depth
    out, proc = runs["droppeft"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["failures"] == []
    cap = {d["device"]: d.get("max_active") for d in read_rows(out)[0]["devices"]}
    assert cap["roomy"] is None and 0 < cap["tight"] < 8, cap
    out, proc = runs["fedlora"]
    assert proc.returncode == 0, proc.stderr[-3000:]  # the run finished, without the killed host
    (failure,) = json.loads((out / "summary.json").read_text())["failures"]
    assert failure["device"] == "tight" and failure["kind"] == "crash" and "OOM killer" in failure["cause"], failure
    assert "tight: agent (rank 2) exited" in proc.stderr and "OOM killer" in proc.stderr
