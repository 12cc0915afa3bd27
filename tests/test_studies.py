"""CI-sized versions of the methods' study on real MiniLM.

AG News sample, 4 devices of three Jetson classes, Dirichlet(0.5), length 32, 5 rounds x 6
steps, modelled clock.
"""
import functools
import json
import math

import pytest

from testbed.core.config import load_config
from testbed.core.plan import Plan
from testbed.experiments.run import run_inprocess
from testbed.experiments.setup import setup
from tests.helpers import AG_NEWS, ROOT

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    sets = [f"data.train_file={AG_NEWS / 'train.csv'}", f"data.test_file={AG_NEWS / 'test.csv'}", "rounds=5",
            "train.local_steps=6", "model.max_length=32", "data.max_test=200",
            "devices={jetson-tx2: 2, xavier-nx: 1, agx-orin: 1}", "target_accuracy=1.0"]

    @functools.cache  # the baseline runs once for every test that compares with it
    def run(name: str, *extra: str) -> tuple[dict, list[dict]]:
        cfg = load_config(ROOT / "examples" / "agnews-jetsons.yaml", [*sets, f"strategy.name={name}", *extra])
        where = out / "-".join([name, *extra]).replace("/", "_")
        summary = run_inprocess(cfg, where, quiet=True)
        rows = [json.loads(l) for l in (where / "metrics.jsonl").read_text().splitlines()]
        return summary, rows

    return run, sets


def test_fedpruner_prunes_small_devices_and_converges(study):
    run, sets = study
    cfg = load_config(ROOT / "examples" / "agnews-jetsons.yaml", [*sets, "strategy.name=fedpruner"])
    exp = setup(cfg)
    half = exp.cost.peak_memory_bytes(exp.devices["jetson-tx2-0"], Plan(ranks={l: 8 for l in range(3, 6)},
                                                                        layers=[3, 4, 5], batch_size=16))
    summary, rows = run("fedpruner", f"devices.jetson-tx2={{count: 2, memory_mb: {half / 2**20 + 1:.1f}}}")
    assert summary["failures"] == [] and summary["final_accuracy"] > 0.4
    for r in rows:
        for d in r["devices"]:
            assert d["layers"] == (3 if d["class"] == "jetson-tx2" else 6)
        tx2 = max(d["peak_train_mem_mb"] for d in r["devices"] if d["class"] == "jetson-tx2")
        assert tx2 < min(d["peak_train_mem_mb"] for d in r["devices"] if d["class"] != "jetson-tx2")


def time_to(rows: list[dict], target: float) -> float:
    return next((r["clock_s"] for r in rows if r["accuracy"] >= target), math.inf)


def test_legend_reaches_the_target_sooner_than_fedlora(study):
    run, _ = study
    rows = {name: run(name)[1] for name in ("fedlora", "legend")}
    # The mechanism: the TX2s train fewer layers, so rounds end at the median device's deadline.
    for r in rows["legend"]:
        assert all(d["layers"] < 6 for d in r["devices"] if d["class"] == "jetson-tx2")
    assert rows["legend"][-1]["clock_s"] < 0.8 * rows["fedlora"][-1]["clock_s"]
    # The outcome: the target is reached in less modelled time.
    assert time_to(rows["legend"], 0.6) < time_to(rows["fedlora"], 0.6) < math.inf


def test_droppeft_reaches_the_target_sooner_than_fedlora(study):
    run, _ = study
    rows = {name: run(name)[1] for name in ("fedlora", "droppeft")}
    # The mechanism: the TX2s, the round's stragglers, skip layers; the AGX Orin, which finishes
    # early whatever the TX2s run, gains no round time from dropout and runs none.
    assert any(d["drop"] > 0 for r in rows["droppeft"] for d in r["devices"] if d["class"] == "jetson-tx2")
    assert all(d["drop"] == 0 for r in rows["droppeft"] for d in r["devices"] if d["class"] == "agx-orin")
    assert rows["droppeft"][-1]["clock_s"] < rows["fedlora"][-1]["clock_s"]
    # The outcome: the target is reached in less modelled time.
    assert time_to(rows["droppeft"], 0.6) < time_to(rows["fedlora"], 0.6) < math.inf
