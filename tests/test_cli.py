"""The `testbed` command's own behaviour: fast, quiet failures, --version, `check`, `init`."""
import csv
import subprocess
import sys
import time

import yaml

from testbed import __version__
from testbed.model.tiny import tiny_config
from tests.helpers import ENV, ROOT, cli, write_config


def test_an_unknown_model_fails_at_once_in_one_line_without_asking_the_hub(tmp_path):
    """Offline by default: no hub retries, even with HF_HUB_OFFLINE unset."""
    env = {k: v for k, v in ENV.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(ROOT / "examples" / "quickstart.yaml"),
                           "--set", "model.name=no-such-org/no-such-model", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("testbed: error: model.name: 'no-such-org/no-such-model' is not in the local")
    assert "HF_HUB_OFFLINE=0" in line  # how to fetch it
    assert took < 5, f"took {took:.1f} s"
    assert not (tmp_path / "out").exists()  # and no run directory was made, or announced


def test_version():
    proc = cli(["--version"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"testbed {__version__}"


def test_check_validates_everything_but_loads_no_model(tmp_path):
    """A model directory that holds nothing passes: `check` only finds the model."""
    (tmp_path / "model").mkdir()
    config = write_config(tmp_path, tiny_config(str(tmp_path / "model"), **{"devices": {"laptop": 3}}))
    proc = cli(["check", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ready (checked without loading the model; nothing was trained)" in proc.stdout
    assert "devices   3: 3 laptop" in proc.stdout and "200 training rows" in proc.stdout
    assert not list(tmp_path.glob("runs"))
    for sets, culprit in [(["devices.laptop=400"], "devices"), (["data.source=files"], "data.train_file"),
                          (["devices.jetson=1"], "did you mean `jetson-tx2`?"),
                          (["strategy.name=droppeft", "strategy.personal_k=-1"], "strategy.personal_k"),
                          (["strategy.name=droppeft", "strategy.shapes=[flat]"], "strategy.shapes"),
                          (["strategy.name=adaptive", "strategy.factors=[0]"], "strategy.factors"),
                          ([f"model.name={tmp_path / 'nothing'}"], "model.name")]:
        proc = cli(["check", str(config), *(w for s in sets for w in ("--set", s))], cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("testbed: error: "), proc.stderr
        assert culprit in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_check_with_an_inventory_checks_the_deployed_devices():
    proc = cli(["check", "examples/quickstart.yaml", "-i", "inventory/lab-emulated.yaml"])
    assert proc.returncode == 0, proc.stderr
    assert "devices   3: 1 laptop, 1 orin-nano, 1 jetson-tx2" in proc.stdout


def test_init_writes_a_commented_config_that_checks_and_runs(tiny_bert, tmp_path):
    assert cli(["init"], cwd=tmp_path).returncode == 0
    text = (tmp_path / "experiment.yaml").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert len([line for line in lines if "#" in line]) > len(lines) / 2  # most lines explain themselves
    assert "source: synthetic" in text and "docs/config.md" in text
    assert cli(["check", "experiment.yaml"], cwd=tmp_path).returncode == 0
    run = cli(["run", "experiment.yaml", "--set", f"model.name={tiny_bert}", "--set", "rounds=1", "--out", "r",
               "--quiet"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    again = cli(["init"], cwd=tmp_path)
    assert again.returncode == 2 and "experiment.yaml exists already" in again.stderr


def test_init_on_own_data_fills_in_the_file_and_columns(tmp_path):
    rows = [{"review": f'"{word}", said the {i}th, "{word}"', "mood": i % 2} for i, word in
            enumerate(["fine", "awful"] * 40)]
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "reviews.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["review", "mood"])
        writer.writeheader()
        writer.writerows(rows)
    proc = cli(["init", "--data", "data/reviews.csv", "--text", "review", "--label", "mood", "--out", "own.yaml"],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load((tmp_path / "own.yaml").read_text())["data"]
    assert (data["source"], data["train_file"], data["test_file"]) == ("files", "data/reviews.csv", "data/reviews.csv")
    assert (data["text_columns"], data["label_column"]) == (["review"], "mood")
    checked = cli(["check", "own.yaml"], cwd=tmp_path)
    assert checked.returncode == 0 and "80 training rows" in checked.stdout, checked.stderr
    lone = cli(["init", "--text", "review", "--out", "x.yaml"], cwd=tmp_path)
    assert lone.returncode == 2 and "--data" in lone.stderr
