import re
from pathlib import Path

import pytest
import yaml

from testbed.core.config import (FALLBACK_LR, MEASURED_LR, ExperimentConfig,
                                 check_same_experiment, load_config, save_config)
from testbed.core.errors import TestbedError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")
                                         if not p.name.startswith("study-")))  # studies: test_compare.py
def test_shipped_examples_load(name):
    cfg = load_config(ROOT / "examples" / name)
    assert isinstance(cfg, ExperimentConfig)


def test_defaults_and_stable_top_level_keys(tmp_path):
    cfg = load_config(write(tmp_path, {}))
    for key in ["seed", "rounds", "strategy", "model", "data", "devices", "train", "clock",
                "target_accuracy", "eval_every"]:
        assert hasattr(cfg, key)
    assert cfg.strategy.name == "fedlora" and cfg.model.name == "minilm"


@pytest.mark.parametrize("data, key, words", [
    ({"train": {"lr_typo": 1}}, "train.lr_typo", "unknown key"),
    ({"rounds": "five"}, "rounds", "expected int"),
    ({"rounds": 0}, "rounds", "below the minimum"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size", "expected int"),
    ({"data": {"alpha": 0}}, "data.alpha", "greater than 0"),
    ({"data": {"alpha": -1.0}}, "data.alpha", "greater than 0"),
    ({"clock": "sundial"}, "clock", "not one of"),
    ({"strategy": {"name": "nope"}}, "strategy.name", "unknown strategy"),
    ({"devices": {"reference": {"count": 0}}}, "devices.reference.count", "below the minimum"),
    ({"model": {"lora": {"rank": True}}}, "model.lora.rank", "expected int"),
    ({"target_accuracy": 1.5}, "target_accuracy", "above the maximum"),
    ({"train": {"lr": "fast"}}, "train.lr", "expected float or 'auto'"),
])
def test_bad_values_name_file_and_dotted_key(tmp_path, data, key, words):
    path = write(tmp_path, data)
    with pytest.raises(TestbedError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and f" {key}:" in msg and words in msg


@pytest.mark.parametrize("data, hint", [
    ({"train": {"lrr": 1e-3}}, "train.lrr: unknown key; did you mean `lr`?"),
    ({"round": 3}, "round: unknown key; did you mean `rounds`?"),
    ({"strategy": {"name": "fedlorra"}}, "unknown strategy 'fedlorra'; did you mean `fedlora`?"),
    ({"strategy": {"name": "legend", "max_rnak": 8}}, "strategy.max_rnak: unknown key; did you mean `max_rank`?"),
])
def test_a_misspelt_key_or_name_gets_a_guess(tmp_path, data, hint):
    with pytest.raises(TestbedError, match=re.escape(hint)):
        load_config(write(tmp_path, data))
    with pytest.raises(TestbedError) as err:
        load_config(write(tmp_path, {"zebra": 1}))
    assert "did you mean" not in str(err.value)  # no guess where nothing is close


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(TestbedError, match="line 2"):
        load_config(write(tmp_path, "rounds: 3\n  bad: [\n"))
    with pytest.raises(TestbedError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(TestbedError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_set_overrides_any_key_and_is_validated(tmp_path):
    path = write(tmp_path, {"train": {"lr": 0.1}})
    cfg = load_config(path, ["train.lr=1e-3", "model.lora.rank=4", "devices.jetson-tx2=3", "data.text_columns=[a, b]"])
    assert cfg.train.lr == 1e-3 and cfg.model.lora.rank == 4
    assert cfg.devices["jetson-tx2"].count == 3 and cfg.data.text_columns == ["a", "b"]
    with pytest.raises(TestbedError, match="train.nope: unknown key"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(TestbedError, match="KEY=VALUE"):
        load_config(path, ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, {"rounds": 3, "devices": {"xavier-nx": 2}}), ["seed=7"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_lr_auto_is_the_models_measured_default_and_an_explicit_lr_is_kept(tmp_path):
    assert load_config(write(tmp_path, {})).train.lr == MEASURED_LR["minilm"]
    assert load_config(write(tmp_path, {}), ["train.lr=auto"]).train.lr == MEASURED_LR["minilm"]
    assert load_config(write(tmp_path, {"model": {"name": "org/unmeasured"}})).train.lr == FALLBACK_LR
    for lr in (FALLBACK_LR, 1e-3, 0.0):  # any number, even a table's, is the config's own
        assert load_config(write(tmp_path, {"train": {"lr": lr}})).train.lr == lr
    # The run directory records the number, so a resume with `auto` matches it while the table does.
    cfg = load_config(write(tmp_path, {}))
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == MEASURED_LR["minilm"]
    check_same_experiment(cfg, tmp_path / "config.yaml")
