"""Run directories: one process at a time (a lock the kernel frees when its holder dies), no run
written over another without --force, and a resume only of the directory's own experiment, never
below the rounds it has done."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from testbed.agent.agent import Agent
from testbed.comm.transport import InProcess
from testbed.core.config import from_dict, save_config
from testbed.core.errors import TestbedError
from testbed.experiments.run import run_inprocess
from testbed.experiments.runs import read_rows
from testbed.experiments.setup import setup
from testbed.model.tiny import tiny_config
from testbed.server.checkpoint import load_checkpoint
from testbed.server.loop import RoundLoop
from testbed.server.rundir import LOCK, RunDir
from tests.helpers import ENV, cli, write_config


def test_a_held_directory_is_refused_naming_its_holder(tiny_bert, tmp_path):
    raw = tiny_config(tiny_bert, rounds=1)
    config = write_config(tmp_path, raw)
    out = tmp_path / "run"
    run_inprocess(from_dict(raw), out, quiet=True)
    with RunDir.take(out, from_dict(raw), resume=True):
        for args in (["--out", str(out)], ["--out", str(out), "--force"], ["--resume", str(out)]):
            proc = cli(["run", str(config), *args, "--quiet"], cwd=tmp_path)
            assert proc.returncode == 2, proc.stderr
            assert f"{out}: in use by process {os.getpid()}" in proc.stderr, proc.stderr
        assert (out / "summary.json").is_file()  # --force removed nothing
    assert cli(["run", str(config), "--resume", str(out), "--quiet"], cwd=tmp_path).returncode == 0  # released


def test_the_lock_of_a_killed_process_is_taken_over(tiny_bert, tmp_path):
    """flock: the kernel releases the lock of a process that dies, however it dies."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from testbed.server.rundir import lock; lock(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(300)", str(out)],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    cfg = from_dict(tiny_config(tiny_bert, rounds=1))
    with pytest.raises(TestbedError, match=f"in use by process {holder.pid}"):
        RunDir.take(out, cfg)
    holder.kill()
    holder.wait()
    with RunDir.take(out, cfg):
        assert (out / LOCK).read_text().strip() == str(os.getpid())


def test_out_onto_a_run_is_refused_unless_forced_and_force_removes_it_first(tiny_bert, tmp_path):
    config = write_config(tmp_path, tiny_config(tiny_bert, rounds=2))
    out = tmp_path / "run"
    assert cli(["run", str(config), "--out", str(out), "--quiet"], cwd=tmp_path).returncode == 0
    before = (out / "metrics.jsonl").read_text()
    again = cli(["run", str(config), "--out", str(out), "--quiet", "--set", "train.lr=0.01"], cwd=tmp_path)
    assert again.returncode == 2
    assert f"{out} holds a run already" in again.stderr and f"--resume {out}" in again.stderr
    assert "--force" in again.stderr and (out / "metrics.jsonl").read_text() == before  # untouched

    # --force removes the old run's files before anything else, so that a replacement stopped
    # early never leaves the old summary and checkpoint beside its own config.
    with RunDir.take(out, from_dict(tiny_config(tiny_bert, rounds=2)), force=True):
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    forced = cli(["run", str(config), "--out", str(out), "--quiet", "--force", "--set", "train.lr=0.01"],
                 cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.01
    assert [r["round"] for r in read_rows(out)] == [0, 1]


def test_resume_refuses_another_experiments_checkpoint_and_fewer_rounds(tiny_bert, tmp_path):
    raw = tiny_config(tiny_bert, rounds=2)
    config = write_config(tmp_path, raw)
    out = tmp_path / "run"
    run_inprocess(from_dict(raw), out, quiet=True)

    fewer = cli(["run", str(config), "--resume", str(out), "--set", "rounds=1"], cwd=tmp_path)
    assert fewer.returncode == 2 and f"rounds 1 is below the 2 rounds {out} has done" in fewer.stderr

    # What an overwrite stopped before its first round used to leave: a new config beside the
    # old run's checkpoint.
    other = from_dict({**raw, "train": {**raw["train"], "lr": 0.01}})
    save_config(other, out / "config.yaml")
    stale = cli(["run", str(config), "--resume", str(out), "--set", "train.lr=0.01"], cwd=tmp_path)
    assert stale.returncode == 2, stale.stderr
    assert f"{out / 'checkpoint.pt'} is another experiment's (its train.lr differs" in stale.stderr


def test_a_run_being_extended_has_no_summary_until_it_finishes(tiny_bert, tmp_path):
    """A directory with a summary holds a finished run: an extension stopped halfway must not
    leave the summary of the shorter run beside the longer run's config."""
    raw = tiny_config(tiny_bert, rounds=1)
    run_inprocess(from_dict(raw), tmp_path, quiet=True)
    longer = from_dict({**raw, "rounds": 3})
    exp = setup(longer)
    agents = {d: Agent(d, longer, exp.bb, exp.data.train, exp.data.shards[d], exp.devices[d].memory_mb)
              for d in exp.devices}
    RoundLoop(exp, InProcess(agents), tmp_path, quiet=True, resume=True)  # started, not run
    assert not (tmp_path / "summary.json").exists()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["rounds"] == 3


def test_sigterm_stops_with_a_resume_hint_and_every_round_has_one_row(tiny_bert, tmp_path):
    """A second process during a run is refused; SIGTERM says how far the run got and how to
    continue it; that command continues it (here with fewer rounds, to be quick)."""
    config = write_config(tmp_path, tiny_config(tiny_bert, rounds=200, **{"train.local_steps": 30}))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(config), "--out", str(out), "--quiet"],
                            env=ENV, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first round"
        time.sleep(0.05)
    second = cli(["run", str(config), "--resume", str(out), "--quiet"], cwd=tmp_path)
    assert second.returncode == 2 and f"in use by process {proc.pid}" in second.stderr, second.stderr
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    done = load_checkpoint(out).round + 1
    hint = f"testbed: stopped after round {done} of 200; continue with: testbed run {config} --resume {out}"
    assert hint in stderr.splitlines(), stderr
    assert "Traceback" not in stderr

    resumed = cli(["run", str(config), "--resume", str(out), "--set", f"rounds={done + 1}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"testbed: resuming after round {done} of {done + 1}" in resumed.stderr
    assert f"testbed: results in {out}" in resumed.stderr
    assert [r["round"] for r in read_rows(out)] == list(range(done + 1))  # one row per round
    assert "failures           1 (1 restart)" in resumed.stdout  # the stop is on record, by name
    assert "None" not in resumed.stdout


def test_deploy_refuses_an_out_holding_a_run_before_touching_a_host(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    proc = cli(["deploy", "-i", "inventory/jetsons.yaml", "examples/quickstart.yaml", "--out", str(out)])
    assert proc.returncode == 2 and f"{out} holds a run already (summary.json)" in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1  # no host was tried
