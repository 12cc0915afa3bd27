"""The profiler on a tiny model, the fit of a step's terms, profile files and their errors, and
profile-driven costs."""
import dataclasses
import json

import pytest
import yaml

from testbed.core.config import LoraConfig
from testbed.core.errors import TestbedError
from testbed.measure.profiler import (StepFit, fit_shapes, fit_step,
                                      load_profile, profile_device,
                                      profile_from_dict)
from testbed.model.info import model_info
from testbed.server.costmodel import at_rank
from tests.helpers import ROOT, build


@pytest.fixture(scope="module")
def profiled():
    bb, _ = build("bert")
    info = model_info(bb)
    before = {n: t.clone() for n, t in bb.model.state_dict().items()}
    return bb, info, before, profile_device(bb, "tiny-bert", info, LoraConfig(rank=4, alpha=8), batch_size=4,
                                            seq_len=16, ranks=(2, 4), repeats=2)


def test_profile_measures_every_layer(profiled):
    bb, info, before, p = profiled
    assert p.num_layers == 3 and sorted(p.forward_lora_s) == [2, 4] and sorted(p.backward_s) == [2, 4]
    for series in (p.forward_frozen_s, p.forward_lora_s[2], p.backward_s[4]):
        assert len(series) == 3 and all(t > 0 for t in series)
    assert all(b > 0 for b in p.saved_bytes_per_token)
    assert p.resident_bytes == [sum(x.numel() * 4 for x in layer.parameters()) for layer in bb.layers]
    assert p.lora_bytes_per_rank == 2 * (32 + 32) * 4 and p.optimizer_bytes_per_rank == 2 * p.lora_bytes_per_rank
    assert p.fit.shapes == [[4, 16], [8, 8], [2, 8], [1, 32]]
    assert min(p.fit.layer_s, p.fit.token_s, p.fit.attention_s, p.fit.outside_s, p.fit.outside_token_s) >= 0
    assert p.fit.layer(4, 16) > 0
    # Its optimizer steps at lr 0: the model (the head too) is left as it was, nothing trainable.
    assert all(t.equal(before[n]) for n, t in bb.model.state_dict().items())
    assert not any(t.requires_grad for t in bb.model.parameters())


KNOWN = StepFit([], layer_s=2e-3, token_s=3e-5, attention_s=4e-8, outside_s=1e-2, outside_token_s=5e-6)


@pytest.mark.parametrize("known", [KNOWN, dataclasses.replace(KNOWN, attention_s=0.0, outside_token_s=0.0)])
def test_the_fit_recovers_known_terms_from_exact_timings(known):
    shapes = fit_shapes(16, 64, 512)
    fit = fit_step(shapes, [known.layer(b, l) for b, l in shapes], [known.outside(b, l) for b, l in shapes])
    assert fit.shapes == shapes
    for term in ("layer_s", "token_s", "attention_s", "outside_s", "outside_token_s"):
        assert getattr(fit, term) == pytest.approx(getattr(known, term), rel=1e-9, abs=1e-15), term


def test_the_fit_takes_no_negative_term():
    """Timings where a plain least-squares fit would make a longer step cheaper per token."""
    shapes = [[16, 64], [32, 32], [8, 32], [4, 128]]
    fit = fit_step(shapes, [0.060, 0.064, 0.016, 0.028], [0.03, 0.01, 0.02, 0.04])
    terms = (fit.layer_s, fit.token_s, fit.attention_s, fit.outside_s, fit.outside_token_s)
    assert min(terms) >= 0 and fit.attention_s == 0 and max(terms) > 0


@pytest.mark.parametrize("batch,length", [(16, 64), (1, 128), (2, 16), (5, 33), (64, 512)])
def test_fit_shapes_need_no_more_memory_or_positions_than_the_profiled_one(batch, length):
    shapes = fit_shapes(batch, length, 512)
    assert shapes[0] == [batch, length] and len(shapes) >= 2
    for b, l in shapes:
        assert b >= 1 and l <= 512 and b * l <= batch * length and b * l * l <= batch * length * length


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_profile_round_trips(profiled, tmp_path, suffix):
    _, info, _, p = profiled
    p.save(tmp_path / f"p{suffix}")
    assert load_profile(tmp_path / f"p{suffix}", info) == p


def test_a_profile_without_a_fit_loads_and_scales_linearly_in_tokens(tmp_path):
    """A profile file written before the profiler fitted a step's terms (the shipped MiniLM
    reference without its `fit`): seconds proportional to tokens, as before."""
    raw = yaml.safe_load((ROOT / "inventory" / "profiles" / "minilm-reference.yaml").read_text())
    del raw["fit"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    shipped = load_profile(tmp_path / "old.yaml")
    assert shipped.fit is None
    old = shipped.embed_s + shipped.head_s + sum(shipped.forward_lora_s[2]) + sum(shipped.backward_s[2])
    assert shipped.step_seconds(16, 64) == pytest.approx(old)
    assert shipped.step_seconds(32, 128) == pytest.approx(4 * old)
    assert shipped.layer_scale(8, 64) == pytest.approx(0.5) and shipped.layer_scale(16, 32) == pytest.approx(0.5)
    # A device profiled at another shape is compared with the reference at the reference's shape.
    device = dataclasses.replace(shipped, batch_size=8, seq_len=128, fit=dataclasses.replace(KNOWN, shapes=[[8, 128]]))
    layers = sum(device.layers_s()) * KNOWN.layer(16, 64) / KNOWN.layer(8, 128)
    assert device.speed(shipped) == pytest.approx(old / (KNOWN.outside(16, 64) + layers))


def test_bad_profiles_name_the_file(profiled, tmp_path):
    _, info, _, p = profiled
    corrupt = tmp_path / "corrupt.yaml"
    corrupt.write_text("model: [unclosed\n")
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"name": "not a profile"}))
    other = tmp_path / "other.yaml"
    p.save(other)
    other.write_text(other.read_text().replace(p.fingerprint, "0" * 16))
    bad_fit = tmp_path / "bad-fit.yaml"
    p.save(bad_fit)
    bad_fit.write_text(bad_fit.read_text().replace("  outside_s:", "  outside:"))
    for path, words in ((corrupt, "not a readable device profile"), (foreign, "missing"),
                        (other, "not of this run's model"), (tmp_path / "absent.yaml", "not found"),
                        (bad_fit, "malformed device profile")):
        with pytest.raises(TestbedError, match=words) as err:
            load_profile(path, info)
        assert str(path) in str(err.value)
    saved = dataclasses.asdict(p)
    for fit in ({**saved["fit"], "token_s": -1e-6}, {**saved["fit"], "layer_s": "fast"}, {"layer_s": 1.0}):
        with pytest.raises(TestbedError, match="rank 1's profile: malformed device profile"):
            profile_from_dict({**saved, "fit": fit}, "rank 1's profile", info)


def test_a_device_described_by_its_own_profile_takes_its_speed_and_link(tiny_bert, tmp_path):
    """A device whose profile took twice the reference's seconds runs at half its speed."""
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
