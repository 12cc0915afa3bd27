"""Faults a distributed run survives: bad replies, a hung agent that comes back, a killed job resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from launch.cmdline import mpirun_command
from launch.faults.inject import kill_job, rank_pids, wait_for
from launch.faults.malformed import CASES, run_corpus
from launch.net import free_port
from testbed.core.config import from_dict
from testbed.experiments.run import run_inprocess
from testbed.experiments.runs import read_rows, strip_wall
from testbed.model.tiny import tiny_config
from tests.helpers import ENV, ROOT, cli, write_config

pytestmark = pytest.mark.dist


def test_every_malformed_reply_is_refused_and_logged():
    """Over gloo, through rank 0's own receiving code: the honest control is admitted, every
    other case refused at the stage meant to catch it, with its reason in the log."""
    lines, log = run_corpus()
    assert [l["case"] for l in lines] == [c for c, _ in CASES]
    assert lines[0] == {"case": "control", "stage": "none", "rejected": False, "reason": ""}
    for line in lines[1:]:
        assert line["rejected"] and line["reason"], line
        where = "rejected the reply of d0" if line["stage"] == "wire" else "rejected the update of d0"
        assert f"{where} (rank 1): {line['reason']}" in log or f"{where}: {line['reason']}" in log, line
    by_case = {l["case"]: l["reason"] for l in lines}
    assert "message 1)" in by_case["replay"] and "d-unknown" in by_case["unknown device"]
    assert "for round 4" in by_case["wrong round"] and "float64" in by_case["float64 dtype"]


def test_a_hung_agent_times_out_and_rejoins_when_it_answers(tiny_bert, tmp_path):
    """SIGSTOP an agent past the round's deadline: its device is recorded as timed out and the
    run goes on; after SIGCONT its late reply is dropped and the device takes part again."""
    raw = tiny_config(tiny_bert, rounds=6, devices={"laptop": 3},
                      **{"train.local_steps": 100, "dist.deadline_s": 6, "dist.profile": False})
    out = tmp_path / "out"
    proc = subprocess.Popen(mpirun_command(str(write_config(tmp_path, raw)), [], out, 3), env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        victims = wait_for("agent rank 2 started", lambda: rank_pids(2), proc)
        wait_for("round 0 done", lambda: read_rows(out), proc)
        for pid in victims:
            os.kill(pid, signal.SIGSTOP)
        wait_for("a round without laptop-1", lambda: any(
            "laptop-1" in r["failures"] for r in read_rows(out)), proc, timeout=60)
        for pid in victims:
            os.kill(pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 6
    assert [(f["device"], f["kind"]) for f in summary["failures"]] == [("laptop-1", "timeout")], summary["failures"]
    missed = summary["failures"][0]["round"]
    r = read_rows(out)
    assert "laptop-1" not in {d["device"] for d in r[missed]["devices"]}
    assert "laptop-1" in {d["device"] for d in r[-1]["devices"]}, "the device never rejoined"
    assert "answered after the deadline" in stderr


def test_a_killed_mpi_job_resumes_to_the_same_metrics(tiny_bert, tmp_path):
    """SIGKILL the whole job (mpirun, aggregator and agents) mid-run, then `testbed run
    --launcher mpi --resume`: fresh agents, and the metrics of an uninterrupted run."""
    raw = tiny_config(tiny_bert, rounds=5, devices={"laptop": 2, "jetson-tx2": 1},
                      **{"strategy.name": "droppeft", "strategy.personal_k": 0, "strategy.clients_per_round": 2,
                         "data.partition": "dirichlet", "train.local_steps": 40, "dist.profile": False})
    config = write_config(tmp_path, raw)
    out = tmp_path / "cut"
    proc = subprocess.Popen(mpirun_command(str(config), [], out, 2), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for("two rounds done", lambda: len(read_rows(out)) >= 2, proc)
    finally:
        assert kill_job(proc) >= 3  # mpirun and the three ranks at least
    assert 2 <= len(read_rows(out)) < 5
    resumed = cli(["run", str(config), "--launcher", "mpi", "--agents", "2", "--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after round" in resumed.stderr
    assert [f["kind"] for f in json.loads((out / "summary.json").read_text())["failures"]] == ["restart"]
    torch.set_num_threads(1)
    run_inprocess(from_dict(raw), tmp_path / "whole", quiet=True)
    assert strip_wall(read_rows(out)) == strip_wall(read_rows(tmp_path / "whole"))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (out, tmp_path / "whole"))
    assert all(torch.equal(a["lora"][l][n], b["lora"][l][n]) for l in b["lora"] for n in b["lora"][l])


def test_resume_is_refused_where_agents_kept_personal_layers(tiny_bert, tmp_path):
    """Personal layers live only in the agent processes of a distributed run (and an in-process
    run's cannot be handed to agents): resuming either under mpi would not be exact."""
    raw = tiny_config(tiny_bert, rounds=1, devices={"laptop": 2},
                      **{"strategy.name": "droppeft", "strategy.personal_k": 1, "dist.profile": False})
    config = write_config(tmp_path, raw)
    proc = subprocess.run(mpirun_command(str(config), [], tmp_path / "mpi", 2), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for launcher in ("mpi", "inprocess"):
        again = cli(["run", str(config), "--launcher", launcher, "--resume", str(tmp_path / "mpi"), "--set", "rounds=2"])
        assert again.returncode == 2 and "laptop-0, laptop-1 kept personal layers" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr and "mpirun" not in again.stderr
    run_inprocess(from_dict(raw), tmp_path / "local", quiet=True)
    again = cli(["run", str(config), "--launcher", "mpi", "--resume", str(tmp_path / "local"), "--set", "rounds=2"])
    assert again.returncode == 2 and "resume it in-process" in again.stderr, again.stderr


def test_an_agent_with_the_wrong_secret_cannot_join_and_is_on_record(tiny_bert, tmp_path):
    """torchrun-style ranks, each reading the secret from its file: rank 2's is another, so its
    hello fails the digest; rank 0 logs it, runs without its device and records it."""
    config = write_config(tmp_path, tiny_config(tiny_bert, devices={"laptop": 2}, **{"dist.profile": False}))
    secrets = {}
    for name in ("right", "wrong"):
        secrets[name] = tmp_path / name
        secrets[name].write_bytes(os.urandom(16).hex().encode())
    env = {**ENV, "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1"))}
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "launch.mpi", str(config), "--out", str(out)], cwd=ROOT,
                              env={**env, "RANK": str(rank), "TESTBED_SECRET_FILE": str(secrets[which])},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, which in ((0, "right"), (1, "right"), (2, "wrong"))]
    try:
        log = procs[0].communicate(timeout=240)[0]
    finally:
        for p in procs[1:]:
            p.kill()  # rank 2 waits for a rank 0 that gave up on it
            p.wait()
    assert procs[0].returncode == 0, log[-3000:]
    assert "rank 2: failed to join: digest mismatch" in log
    summary = json.loads((out / "summary.json").read_text())
    assert [(f["device"], f["kind"], f["round"]) for f in summary["failures"]] == [("laptop-1", "join", 0)]
    assert all([d["device"] for d in r["devices"]] == ["laptop-0"] for r in read_rows(out))
