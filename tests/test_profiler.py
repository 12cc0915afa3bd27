"""The profiler on a tiny model, profile files and their errors, and profile-driven costs."""
import json

import pytest

from testbed.core.config import LoraConfig
from testbed.core.errors import TestbedError
from testbed.measure.profiler import load_profile, profile_device
from testbed.model.info import model_info
from testbed.server.costmodel import at_rank
from tests.helpers import build


@pytest.fixture(scope="module")
def profiled():
    bb, _ = build("bert")
    info = model_info(bb)
    return bb, info, profile_device(bb, "tiny-bert", info, LoraConfig(rank=4, alpha=8), batch_size=4, seq_len=16,
                                    ranks=(2, 4), repeats=2)


def test_profile_measures_every_layer(profiled):
    bb, info, p = profiled
    assert p.num_layers == 3 and sorted(p.forward_lora_s) == [2, 4] and sorted(p.backward_s) == [2, 4]
    for series in (p.forward_frozen_s, p.forward_lora_s[2], p.backward_s[4]):
        assert len(series) == 3 and all(t > 0 for t in series)
    assert all(b > 0 for b in p.saved_bytes_per_token)
    assert p.resident_bytes == [sum(x.numel() * 4 for x in layer.parameters()) for layer in bb.layers]
    assert p.lora_bytes_per_rank == 2 * (32 + 32) * 4 and p.optimizer_bytes_per_rank == 2 * p.lora_bytes_per_rank


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_profile_round_trips(profiled, tmp_path, suffix):
    _, info, p = profiled
    p.save(tmp_path / f"p{suffix}")
    assert load_profile(tmp_path / f"p{suffix}", info) == p


def test_bad_profiles_name_the_file(profiled, tmp_path):
    _, info, p = profiled
    corrupt = tmp_path / "corrupt.yaml"
    corrupt.write_text("model: [unclosed\n")
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"name": "not a profile"}))
    other = tmp_path / "other.yaml"
    p.save(other)
    other.write_text(other.read_text().replace(p.fingerprint, "0" * 16))
    for path, words in ((corrupt, "not a readable device profile"), (foreign, "missing"),
                        (other, "not of this run's model"), (tmp_path / "absent.yaml", "not found")):
        with pytest.raises(TestbedError, match=words) as err:
            load_profile(path, info)
        assert str(path) in str(err.value)


def test_a_device_described_by_its_own_profile_takes_its_speed_and_link(tiny_bert, tmp_path):
    """A device whose profile took twice the reference's seconds runs at half its speed."""
    import dataclasses

    from testbed.core.config import from_dict
    from testbed.core.devices import devices_from_config
    from testbed.experiments.setup import setup
    from testbed.model.tiny import tiny_config

    reference = setup(from_dict(tiny_config(tiny_bert))).cost.profile
    slower = dataclasses.replace(
        reference, source="measured", embed_s=2 * reference.embed_s, head_s=2 * reference.head_s,
        forward_frozen_s=[2 * t for t in reference.forward_frozen_s],
        forward_lora_s={r: [2 * t for t in ts] for r, ts in reference.forward_lora_s.items()},
        backward_s={r: [2 * t for t in ts] for r, ts in reference.backward_s.items()},
        bandwidth_mbit=12.5, latency_ms=3.0)
    slower.save(tmp_path / "board.yaml")
    exp = setup(from_dict(tiny_config(tiny_bert, devices={"board": {"device_class": "jetson-tx2",
                                                                     "profile": str(tmp_path / "board.yaml")}})))
    board = exp.devices["board"]
    assert board.speed == pytest.approx(0.5) and (board.bandwidth_mbit, board.latency_ms) == (12.5, 3.0)
    both = from_dict(tiny_config(tiny_bert, devices={"board": {"device_class": "laptop", "speed": 2.0,
                                                                "profile": str(tmp_path / "board.yaml")}}))
    with pytest.raises(TestbedError, match="devices.board: speed and profile both set"):
        devices_from_config(both.devices)
    # Its speed is its profile's precision's: a run in another precision is refused, naming the file.
    bf16 = {"devices": {"board": {"device_class": "jetson-tx2", "profile": str(tmp_path / "board.yaml")}},
            "train.precision": "bf16"}
    with pytest.raises(TestbedError, match=r"board.yaml: measured at fp32, and the run trains in bf16"):
        setup(from_dict(tiny_config(tiny_bert, **bf16)))


def test_rank_interpolation():
    by_rank = {2: [1.0], 8: [4.0]}
    assert [at_rank(by_rank, r, 0) for r in (1, 2, 4, 8, 16)] == [1.0, 1.0, 2.0, 4.0, 4.0]


@pytest.mark.model
def test_shipped_minilm_profile_is_used_only_where_it_fits():
    from testbed.core.config import ModelConfig
    from testbed.experiments.setup import reference_profile
    from testbed.model.load import load_backbone

    cfg = ModelConfig(name="minilm")
    info = model_info(load_backbone(cfg, 4, seed=0))
    shipped = reference_profile(cfg, info)
    assert shipped.source == "measured" and shipped.num_layers == 6 and shipped.threads == 2
    other = ModelConfig(name="minilm", lora=LoraConfig(targets=["query", "key", "value"]))
    assert reference_profile(other, model_info(load_backbone(other, 4, seed=0))).source == "analytic"
