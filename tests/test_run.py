"""End-to-end in-process runs on a tiny model: outputs, determinism, CLI errors."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from testbed.core.config import from_dict, load_config
from testbed.experiments.run import run_inprocess
from testbed.experiments.runs import read_rows, strip_wall
from testbed.model.tiny import tiny_config
from tests.helpers import AG_NEWS, ROOT, cli


def test_run_writes_config_metrics_and_summary(tiny_bert, tmp_path):
    cfg = from_dict(tiny_config(tiny_bert, rounds=3, eval_every=2))
    summary = run_inprocess(cfg, tmp_path, quiet=True)
    rows = read_rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["accuracy"] is None and rows[1]["accuracy"] is not None and rows[2]["accuracy"] is not None
    for r in rows:
        assert {"round", "clock_s", "wall_s", "accuracy", "loss", "bytes_up", "bytes_down", "devices"} <= set(r)
        assert len(r["devices"]) == 3 and r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert rows[2]["clock_s"] > rows[1]["clock_s"] > rows[0]["clock_s"] > 0
    for key in ["method", "rounds", "final_accuracy", "best_accuracy", "target_accuracy", "time_to_target_s",
                "clock", "bytes_up", "bytes_down", "peak_train_mem_mb", "peak_rss_mb", "devices", "failures"]:
        assert key in summary
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert (tmp_path / "checkpoint.pt").is_file()


def test_modelled_clock_runs_are_identical_but_for_wall_time(tiny_bert, tmp_path):
    cfg = from_dict(tiny_config(tiny_bert, **{"data.partition": "dirichlet", "strategy.clients_per_round": 2}))
    run_inprocess(cfg, tmp_path / "a", quiet=True)
    run_inprocess(cfg, tmp_path / "b", quiet=True)
    a, b = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    assert strip_wall(a) == strip_wall(b)
    assert all(len(r["devices"]) == 2 for r in a)  # client sampling
    other = from_dict(tiny_config(tiny_bert, seed=1))
    run_inprocess(other, tmp_path / "c", quiet=True)
    assert strip_wall(read_rows(tmp_path / "c")) != strip_wall(a)


@pytest.mark.model
def test_fedlora_on_minilm_learns_the_synthetic_task(tmp_path):
    cfg = from_dict(tiny_config("minilm", rounds=2, **{"model.max_length": 32, "train.local_steps": 10,
                                                       "train.batch_size": 16, "devices": {"laptop": 2},
                                                       "data.synthetic_train": 600, "data.synthetic_test": 200}))
    summary = run_inprocess(cfg, tmp_path, quiet=True)
    assert summary["final_accuracy"] > 0.6  # chance is 0.25


@pytest.mark.model
def test_the_thread_count_changes_speed_not_metrics(tmp_path):
    """model.threads: 0 (auto) picks a count from the machine's load, so a run's metrics must not
    depend on it: MiniLM's rows at 1 and 2 threads are equal, but for wall times."""
    try:
        for threads in (1, 2):
            cfg = tiny_config("minilm", **{"model.max_length": 32, "model.threads": threads, "train.local_steps": 4,
                                           "strategy.name": "legend", "devices": {"laptop": 2}})
            run_inprocess(from_dict(cfg), tmp_path / f"t{threads}", quiet=True)
    finally:
        torch.set_num_threads(1)
    assert strip_wall(read_rows(tmp_path / "t1")) == strip_wall(read_rows(tmp_path / "t2"))


@pytest.mark.parametrize("overrides, culprit", [
    (["data.source=files", "data.train_file=missing.csv", "data.test_file=missing.csv"], "data.train_file"),
    (["model.name=no-such-org/no-such-model"], "model.name"),
    (["data.alpha=0", "data.partition=dirichlet"], "data.alpha"),
    (["devices.laptop=400"], "devices"),
    (["devices.pocket-calculator=1"], "pocket-calculator"),
])
def test_cli_user_errors_are_one_line(tiny_bert, tmp_path, overrides, culprit):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_bert)))
    args = ["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    proc = cli(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("testbed: error:")]
    assert len(errors) == 1 and culprit in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_label_column_on_real_csv(tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, **{"data.source": "files", "data.train_file": str(AG_NEWS / "train.csv"),
                                    "data.test_file": str(AG_NEWS / "test.csv"), "data.label_column": "topic",
                                    "data.text_columns": ["title", "description"]})
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = cli(["run", str(config), "--quiet"], cwd=tmp_path)
    assert proc.returncode == 2 and "data.label_column: column 'topic'" in proc.stderr


def test_string_labels_are_printed_and_kept_in_the_run_directory(tiny_bert, tmp_path, capsys):
    rows = "".join(f"{w} film\t{y}\n" for w, y in [("fine", "pos"), ("awful", "neg"), ("dull", "neg")] * 30)
    (tmp_path / "films.tsv").write_text("review\tverdict\n" + rows)
    data = {"source": "files", "train_file": str(tmp_path / "films.tsv"), "test_file": str(tmp_path / "films.tsv"),
            "text_columns": ["review"], "label_column": "verdict", "labels": ["pos", "neg"]}
    run_inprocess(from_dict(tiny_config(tiny_bert, rounds=1, data=data)), tmp_path / "run", quiet=True)
    assert [l for l in capsys.readouterr().err.splitlines() if "labels" in l] == ["testbed: labels pos=0, neg=1"]
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["pos", "neg"]


def test_a_killed_run_resumes_to_the_same_metrics(tiny_bert, tmp_path):
    """SIGKILL mid-run, then --resume: the final metrics equal an uninterrupted run's (modelled clock).
    DropPEFT keeps the most state between rounds: bandits, personal layers on the devices, RNGs."""
    raw = tiny_config(tiny_bert, rounds=6, **{"strategy.name": "droppeft", "strategy.personal_k": 1,
                                              "data.partition": "dirichlet", "train.local_steps": 60})
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_inprocess(load_config(config), tmp_path / "whole", quiet=True)
    out = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(config), "--out", str(out), "--quiet"],
                            env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be cut"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = len(read_rows(out))
    assert 2 <= done < 6
    resumed = cli(["run", str(config), "--resume", str(out), "--quiet"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after round" in resumed.stderr  # the last row, or the one before if cut before its checkpoint
    assert strip_wall(read_rows(out)) == strip_wall(read_rows(tmp_path / "whole"))
    (restart,) = json.loads((out / "summary.json").read_text())["failures"]  # the stop is on record
    # at the checkpoint's round: the last row's, or the one before if the kill came between them
    assert (restart["device"], restart["kind"]) == ("aggregator", "restart") and done - 1 <= restart["round"] <= done
    a, b = torch.load(out / "checkpoint.pt", weights_only=False), torch.load(tmp_path / "whole" / "checkpoint.pt",
                                                                            weights_only=False)
    assert all(torch.equal(a["lora"][l][n], b["lora"][l][n]) for l in b["lora"] for n in b["lora"][l])


def test_resume_refuses_another_experiment(tiny_bert, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_bert, rounds=1)))
    assert cli(["run", str(config), "--out", str(tmp_path / "r"), "--quiet"], cwd=tmp_path).returncode == 0
    other = cli(["run", str(config), "--resume", str(tmp_path / "r"), "--set", "train.lr=0.5"], cwd=tmp_path)
    assert other.returncode == 2 and "train.lr differs" in other.stderr and "Traceback" not in other.stderr
    empty = cli(["run", str(config), "--resume", str(tmp_path / "nothing")], cwd=tmp_path)
    assert empty.returncode == 2 and "not a run directory" in empty.stderr
    extended = cli(["run", str(config), "--resume", str(tmp_path / "r"), "--set", "rounds=2"], cwd=tmp_path)
    assert extended.returncode == 0 and [r["round"] for r in read_rows(tmp_path / "r")] == [0, 1]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["failures"] == []  # extended, not restarted
    assert "testbed: resuming after round 1 of 2" in extended.stderr  # counted as the progress bar counts
    assert "\nfailures           0\n" in extended.stdout + "\n" and "None" not in extended.stdout
