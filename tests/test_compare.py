"""`testbed compare` and `testbed report`: the study matrix, resumable cells, the report's figures.

The tiny random model exercises the machinery (it learns too slowly to show convergence); a
CI-sized study on the real MiniLM checks that every strategy converges and that the report says so.
"""
import dataclasses
import io
import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from testbed.core.config import ExperimentConfig, default_lr, save_config
from testbed.core.errors import TestbedError
from testbed.experiments.report import (_tables, energy_to_target,
                                        group_stats, versus, write_report)
from testbed.experiments.run import run_inprocess
from testbed.experiments.runs import (Group, Run, find_runs, load_run,
                                      read_rows, strip_wall)
from testbed.experiments.study import load_study, run_study
from testbed.model.tiny import tiny_config
from tests.helpers import ROOT, cli

# DropPEFT with two of its eight default arms: with all eight its bandit is still trying
# 0.4-0.6 dropout after 3 rounds, and the global accuracy swings (it converges later).
STRATEGIES = ["fedlora", "hetlora", "flexlora", {"name": "droppeft", "maxima": [0.0, 0.2]}, "legend", "fedpruner"]
LABELS = ["fedlora", "hetlora", "flexlora", "droppeft maxima=[0.0,0.2]", "legend", "fedpruner"]


def write_study(tmp_path, study: dict):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def tiny_study(tmp_path, model: str, **extra) -> dict:
    return {"base": tiny_config(model, target_accuracy=1.0), "strategies": ["fedlora", "hetlora"], "seeds": [0, 1],
            "devices": {"mixed": {"laptop": 2, "jetson-tx2": 1}}, "splits": {"iid": {"partition": "iid"}},
            "out": str(tmp_path / "study"), **extra}


def summaries(out: Path, group: dict) -> list[dict]:
    return [json.loads((out / run / "summary.json").read_text()) for run in group["runs"]]


def test_each_cell_runs_once_a_killed_cell_resumes_and_the_report_matches_the_runs(tiny_bert, tmp_path):
    path = write_study(tmp_path, tiny_study(tmp_path, tiny_bert))
    study = load_study(path)
    assert [c.name for c in study.cells] == ["fedlora/iid/mixed/seed0", "fedlora/iid/mixed/seed1",
                                             "hetlora/iid/mixed/seed0", "hetlora/iid/mixed/seed1"]
    dirs = run_study(study, io.StringIO())
    assert all((d / "summary.json").is_file() for d in dirs)
    assert find_runs([study.out]) == dirs
    uninterrupted = read_rows(dirs[2])

    # One cell deleted, one killed after its first round's checkpoint (as SIGKILL would leave it).
    for f in dirs[0].iterdir():
        f.unlink()
    dirs[0].rmdir()
    run_inprocess(dataclasses.replace(study.cells[2].cfg, rounds=1), dirs[2], quiet=True, force=True)
    (dirs[2] / "summary.json").unlink()
    untouched = {d: (d / "summary.json").stat().st_mtime_ns for d in (dirs[1], dirs[3])}
    log = io.StringIO()
    run_study(load_study(path), log)
    out = log.getvalue()
    assert "2 finished, 2 to run" in out
    assert re.findall(r"\] (\S+):", out) == [study.cells[0].name, study.cells[2].name]
    assert f"{study.cells[2].name}: resumed," in out
    assert {d: (d / "summary.json").stat().st_mtime_ns for d in untouched} == untouched
    assert strip_wall(read_rows(dirs[2])) == strip_wall(uninterrupted)

    report = write_report(dirs, study.out, "fedlora").read_text()
    groups = json.loads((study.out / "report.json").read_text())["groups"]
    assert [g["method"] for g in groups] == ["fedlora", "hetlora"]
    for g, cells in zip(groups, (dirs[:2], dirs[2:])):
        assert g["runs"] == [str(d.relative_to(study.out)) for d in cells]
        runs = [load_run(d) for d in cells]
        finals = [r.summary["final_accuracy"] for r in runs]
        assert g["seeds"] == [0, 1]
        assert g["final_accuracy"] == pytest.approx(statistics.fmean(finals))
        assert g["final_accuracy_std"] == pytest.approx(statistics.stdev(finals))
        assert g["bytes_up_per_round"] == pytest.approx(statistics.fmean(r.summary["bytes_up"] / 2 for r in runs))
        assert g["energy_j"] == pytest.approx(statistics.fmean(r.summary["energy_j"] for r in runs))
        assert g["energy_to_target_j"] is None and g["vs_baseline"]["energy_reduction"] is None  # never reached
        assert f"| {g['energy_j'] / 1e3:.2f} | n/a | n/a |" in report
        for cls in ("laptop", "jetson-tx2"):
            assert g["peak_train_mem_mb_by_class"][cls] == pytest.approx(statistics.fmean(
                max(d["peak_train_mem_mb"] for d in r.summary["devices"].values() if d["class"] == cls) for r in runs))
        # target 1.0 is never reached: shown as such, never as a time of 0, and no ratio drawn from it
        assert g["reached"] == 0 and g["time_to_target_s"] is None and g["vs_baseline"]["speedup"] is None
        assert f"| `{g['method']}` | 2 | 0/2 | not reached | n/a | {g['final_accuracy']:.4f} ± " in report
    pngs = sorted(study.out.glob("*.png"))
    assert [p.name for p in pngs] == ["1-accuracy.png", "1-memory.png", "1-time-to-target.png", "1-traffic.png"]
    for png in pngs:
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000 and f"]({png.name})" in report


def test_energy_to_target_sums_the_rounds_up_to_the_one_that_reached_it(tmp_path):
    rows = [{"energy_j": 10.0}, {"energy_j": 20.0}, {"energy_j": 40.0}]
    assert energy_to_target(Run(tmp_path, ExperimentConfig(), rows, {"rounds_to_target": 2, "energy_j": 70.0})) == 30.0
    never = Run(tmp_path, ExperimentConfig(), rows, {"rounds_to_target": None, "energy_j": 70.0})
    assert energy_to_target(never) is None
    assert energy_to_target(Run(tmp_path, ExperimentConfig(), rows, {"rounds_to_target": 2})) is None  # an older run


def test_a_class_whose_devices_never_finished_a_round_shows_no_footprint_rather_than_zero(tmp_path):
    """FedLoRA's TX2s in the LLM study fail every round (out of memory): their class has no
    footprint, which the table says, and a seed where the class did finish is averaged alone."""
    def run(seed: int, peaks: dict[str, float]) -> Run:
        summary = {"time_to_target_s": None, "rounds_to_target": None, "final_accuracy": 0.5, "best_accuracy": 0.5,
                   "devices": {f"{c}-0": {"class": c, "peak_train_mem_mb": mb} for c, mb in peaks.items()},
                   "peak_rss_mb": 1.0, "bytes_up": 8, "bytes_down": 8, "rounds": 1, "failures": []}
        return Run(tmp_path / str(seed), dataclasses.replace(ExperimentConfig(), seed=seed), [{}], summary)

    full = Group("s", "fedlora", [run(0, {"laptop": 100.0}), run(1, {"laptop": 120.0})])
    pruned = Group("s", "fedpruner", [run(0, {"laptop": 100.0, "jetson-tx2": 50.0}), run(1, {"laptop": 100.0})])
    for g in (full, pruned):
        g.stats = group_stats(g, tmp_path)
        g.stats["vs_baseline"] = versus(g.stats, full.stats)
    assert full.stats["peak_train_mem_mb_by_class"] == {"laptop": 110.0}
    assert pruned.stats["peak_train_mem_mb_by_class"] == {"laptop": 100.0, "jetson-tx2": 50.0}
    table = "\n".join(_tables([full, pruned], "fedlora", True))
    assert "| `fedlora` | 110.0 | none finished |" in table and "| `fedpruner` | 100.0 | 50.0 |" in table


@pytest.mark.parametrize("name", ["study-llm.yaml", "study-llm80.yaml"])
def test_the_llm_studies_load_as_docs_benchmarks_describes_them(name):
    """make bench-llm's studies: every cell valid before hours of runs start."""
    study = load_study(ROOT / "examples" / name)
    devices = {sum(d.count for d in c.cfg.devices.values()) for c in study.cells}
    assert devices == ({8} if name == "study-llm.yaml" else {80})
    assert all(c.cfg.model.name == "smollm2" and c.cfg.data.max_test >= 800 for c in study.cells)
    assert {c.cfg.train.lr for c in study.cells} == {default_lr("smollm2")}  # chosen on validation rows
    assert study.baseline.split()[0] == "fedlora"
    tx2 = [d for c in study.cells for k, d in c.cfg.devices.items() if k == "jetson-tx2"]
    assert tx2 and all(d.memory_mb == 640 for d in tx2)  # FedLoRA's plan (975 MiB counted) does not fit


def test_the_shipped_study_is_the_one_the_readme_describes():
    study = load_study(ROOT / "examples" / "study-agnews.yaml")
    assert len(study.cells) == 42 and study.baseline == "fedlora"
    assert {c.name.split("/")[0] for c in study.cells} == set(STRATEGIES[:3] + ["droppeft", "legend", "fedpruner",
                                                                             "adaptive"])
    assert {(c.split, c.cfg.data.partition) for c in study.cells} == {("iid", "iid"), ("dirichlet0.5", "dirichlet")}
    assert {c.seed for c in study.cells} == {0, 1, 2}
    assert all(sum(d.count for d in c.cfg.devices.values()) == 8 for c in study.cells)


@pytest.mark.parametrize("change, culprit", [
    ({"strategy": ["fedlora"]}, "strategy: unknown key"),
    ({"strategies": "fedlora"}, "strategies: expected a non-empty list"),
    ({"strategies": ["fedlora", "nosuch"]}, "strategies[1]: strategy.name: unknown strategy 'nosuch'"),
    ({"strategies": ["fedlora", {"name": "fedpruner", "selection": "bogus"}]}, "strategies[1]: strategy.selection"),
    ({"strategies": ["fedlora", "fedlora"]}, "strategies[1]: 'fedlora' is already in the study"),
    ({"devices": {"mixed": {"jetson-tx9": 2}}}, "devices.mixed: devices: unknown device class 'jetson-tx9'"),
    ({"devices": {"a/b": {"laptop": 1}}}, "devices: 'a/b' is not a usable name"),
    ({"splits": {"zipf": {"partition": "zipf"}}}, "splits.zipf: data.partition"),
    ({"seeds": [0, "x"]}, "seeds: expected a non-empty list of distinct integers"),
    ({"set": {"train.lr": -1}}, "set: train.lr"),
    ({"target_accuracy": 3}, "target_accuracy: 3.0 is above the maximum 1"),
    ({"baseline": "legend"}, "baseline: 'legend' is not one of the study's strategies"),
    ({"base": "missing.yaml"}, "base: "),
])
def test_bad_study_files_name_the_file_and_key(tiny_bert, tmp_path, change, culprit):
    path = write_study(tmp_path, {**tiny_study(tmp_path, tiny_bert), **change})
    with pytest.raises(TestbedError, match="^" + re.escape(f"{path}: {culprit}")):
        load_study(path)


def test_a_cell_directory_holding_another_experiment_is_refused(tiny_bert, tmp_path):
    study = load_study(write_study(tmp_path, tiny_study(tmp_path, tiny_bert)))
    cfg = study.cells[1].cfg
    cell = study.out / study.cells[1].name
    cell.mkdir(parents=True)
    save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5)), cell / "config.yaml")
    with pytest.raises(TestbedError, match=re.escape(f"{cell}: holds a run whose train.lr differs")):
        run_study(study, io.StringIO())
    with pytest.raises(TestbedError, match="no summary.json: the run has not finished"):
        load_run(cell)


@pytest.mark.model
def test_ci_study_every_strategy_converges_and_the_report_shows_it(tmp_path):
    """All six strategies on MiniLM (synthetic topics, 2 devices, 3 rounds x 5 steps), through the CLI."""
    base = tiny_config("minilm", rounds=3, target_accuracy=0.5, **{
        "model.max_length": 16, "train.local_steps": 5, "train.lr": 3e-3, "data.synthetic_train": 240})
    path = write_study(tmp_path, {"base": base, "strategies": STRATEGIES, "seeds": [0],
                                  "devices": {"mixed": {"laptop": 1, "jetson-tx2": 1}}})
    proc = cli(["compare", str(path), "--out", "ci"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "6 cells" in proc.stderr and "wrote" in proc.stderr
    out = tmp_path / "ci"
    groups = {g["method"]: g for g in json.loads((out / "report.json").read_text())["groups"]}
    assert list(groups) == LABELS
    base_time = groups["fedlora"]["time_to_target_s"]
    report = (out / "report.md").read_text()
    for name, g in groups.items():
        (summary,) = summaries(out, g)
        assert summary["final_accuracy"] > 0.5, name  # chance is 0.25
        assert g["final_accuracy"] == summary["final_accuracy"] and g["time_to_target_s"] == summary["time_to_target_s"]
        assert g["vs_baseline"]["speedup"] == pytest.approx(base_time / summary["time_to_target_s"])
        assert f"| `{name}` | 1 | 1/1 |" in report
    assert len(list(out.glob("1-*.png"))) == 4
