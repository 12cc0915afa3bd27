"""CI-sized versions of the methods' study on real MiniLM.

AG News sample, 4 devices of three Jetson classes, Dirichlet(0.5), length 32, 5 rounds x 6
steps, 200 test rows, modelled clock: every pass a plan asks of a device is charged (training,
probes, validation before and after, transfers).  Every claim is checked on seeds 0 and 1: a
seed changes the data shards, LoRA's initial values and the sampling.

The direction claim of a method that saves time would be: it reaches 90 % of FedLoRA's best
accuracy (FedLoRA's of the same seed and rounds) in less modelled time than FedLoRA does, and
ends above 0.4.  Neither LEGEND nor DropPEFT earns it at this size with all work charged, so
only their mechanisms are asserted here; the honest tests, which fail, are on the branch
`direction-failing` (issue 19, item 5), and the figures are beside each test below.
"""
import functools
import json

import pytest

from testbed.core.config import load_config
from testbed.core.plan import Plan
from testbed.experiments.run import run_inprocess
from testbed.experiments.setup import setup
from tests.helpers import AG_NEWS, ROOT

pytestmark = pytest.mark.model

SEEDS = (0, 1)
SETS = [f"data.train_file={AG_NEWS / 'train.csv'}", f"data.test_file={AG_NEWS / 'test.csv'}", "rounds=5",
        "train.local_steps=6", "model.max_length=32", "data.max_test=200",
        "devices={jetson-tx2: 2, xavier-nx: 1, agx-orin: 1}", "target_accuracy=1.0"]


def config(name: str, seed: int, *extra: str):
    return load_config(ROOT / "examples" / "agnews-jetsons.yaml", [*SETS, f"seed={seed}", f"strategy.name={name}", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")

    @functools.cache  # each run once: FedLoRA's of a seed serves every comparison with it
    def run(name: str, seed: int, *extra: str) -> tuple[dict, list[dict]]:
        where = out / "-".join([name, str(seed), *extra]).replace("/", "_")
        summary = run_inprocess(config(name, seed, *extra), where, quiet=True)
        rows = [json.loads(l) for l in (where / "metrics.jsonl").read_text().splitlines()]
        return summary, rows

    return run


@pytest.mark.parametrize("seed", SEEDS)
def test_fedpruner_prunes_small_devices_and_converges(run, seed):
    """FedPruner's claim is memory, not time: TX2s given only the memory a 3-layer plan needs
    train a 3-layer submodel, in less memory than the others, and the global model still learns."""
    exp = setup(config("fedpruner", seed))
    half = exp.cost.peak_memory_bytes(exp.devices["jetson-tx2-0"], Plan(ranks={l: 8 for l in range(3, 6)},
                                                                        layers=[3, 4, 5], batch_size=16))
    summary, rows = run("fedpruner", seed, f"devices.jetson-tx2={{count: 2, memory_mb: {half / 2**20 + 1:.1f}}}")
    assert summary["failures"] == [] and summary["final_accuracy"] > 0.4
    for r in rows:
        for d in r["devices"]:
            assert d["layers"] == (3 if d["class"] == "jetson-tx2" else 6)
        tx2 = max(d["peak_train_mem_mb"] for d in r["devices"] if d["class"] == "jetson-tx2")
        assert tx2 < min(d["peak_train_mem_mb"] for d in r["devices"] if d["class"] != "jetson-tx2")


# Not met, so not asserted: LEGEND reaches 90 % of FedLoRA's best sooner (measured, 5 rounds):
#   seed 0: target 0.639; LEGEND round 2 at 1.65 s, FedLoRA round 2 at 2.50 s (a same-round
#           crossing: shorter rounds only); finals 0.645 and 0.640.
#   seed 1: target 0.653, FedLoRA round 1 at 1.67 s; LEGEND's best is 0.640 (round 4): never.
# Ten rounds do not rescue it: seed 0's target rises to 0.770 (FedLoRA round 7, 6.67 s), and
# LEGEND's best in 10 rounds is 0.720.  `below: frozen` misses both seeds' targets too
# (best 0.620 and 0.645).
@pytest.mark.parametrize("seed", SEEDS)
def test_legend_trains_fewer_layers_on_the_tx2s_in_shorter_rounds(run, seed):
    """LEGEND's mechanism (the paper's structure): the TX2s train fewer layers, so every round
    ends at the median device's deadline, well before FedLoRA's."""
    rows, base = run("legend", seed)[1], run("fedlora", seed)[1]
    for r in rows:
        assert all(d["layers"] < 6 for d in r["devices"] if d["class"] == "jetson-tx2")
    assert rows[-1]["clock_s"] < 0.8 * base[-1]["clock_s"]


# Not met, so not asserted: DropPEFT's rounds shorter than FedLoRA's, and 90 % of FedLoRA's best
# reached sooner (measured, 5 rounds).  Its reward needs each device's validation before and after
# training, and 2 x a shard's validation split (123-238 rows on the TX2s and the NX) is more
# forward passes than the 6 x 16 rows a round trains: a TX2 validates for 0.8-1.6 s of a round
# that trains in 0.5-0.8 s, so even at the most dropout (0.6) DropPEFT's round is 2.0-2.1 s
# against FedLoRA's 0.83 s (6 x 16 training rows, no validation).
#   seed 0: target 0.639; DropPEFT round 2 at 6.53 s, FedLoRA round 2 at 2.50 s; final 0.410.
#   seed 1: target 0.653; DropPEFT round 4 at 11.50 s, FedLoRA round 1 at 1.67 s; final 0.675.
@pytest.mark.parametrize("seed", SEEDS)
def test_droppeft_drops_layers_on_the_stragglers_only(run, seed):
    """DropPEFT's mechanism: the TX2s, the round's stragglers, skip layers; the AGX Orin, which
    finishes early whatever the TX2s run, gains no round time from dropout and runs none."""
    rows = run("droppeft", seed)[1]
    assert any(d["drop"] > 0 for r in rows for d in r["devices"] if d["class"] == "jetson-tx2")
    assert all(d["drop"] == 0 for r in rows for d in r["devices"] if d["class"] == "agx-orin")
