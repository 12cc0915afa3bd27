"""Decoder backbones (tiny random LLaMA, Qwen2, GPT-2, Mistral and Phi causal-LM checkpoints) with a
classification head: layers, blocks, padding and pooling, residency, and every strategy's round."""
import json

import pytest
import torch

from testbed.core.config import ModelConfig, from_dict
from testbed.experiments.run import run_inprocess
from testbed.model.info import model_info
from testbed.model.layers import running_layers
from testbed.model.load import load_backbone
from testbed.model.residency import hold
from testbed.model.tiny import DECODERS, tiny_config
from testbed.server.strategies import STRATEGIES

LAYERS_PATH = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h", "mistral": "model.layers",
               "phi": "model.layers"}
OUTPUT_PROJ = {"llama": ("self_attn.o_proj", "mlp.down_proj"), "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
               "gpt2": ("attn.c_proj", "mlp.c_proj"), "mistral": ("self_attn.o_proj", "mlp.down_proj"),
               "phi": ("self_attn.dense", "mlp.fc2")}


@pytest.mark.parametrize("family", DECODERS)
def test_a_decoder_gets_a_pad_token_a_head_and_its_layers_and_blocks(tiny_decoders, family):
    bb = load_backbone(ModelConfig(name=tiny_decoders[family]), 4, seed=0)
    assert bb.layers_path == LAYERS_PATH[family] and bb.num_layers == 2
    assert bb.tokenizer.pad_token == bb.tokenizer.eos_token  # the tokenizer shipped without one
    assert bb.model.config.pad_token_id == bb.tokenizer.eos_token_id
    assert list(bb.head_params()) == ["score.weight"]
    info = model_info(bb)
    assert set(info.block_params) == {"attn", "ffn"}
    assert all(info.module_blocks[m] in ("attn", "ffn") for m in bb.modules[0])


@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_classification_pools_the_last_token_that_is_not_padding(tiny_decoders, family):
    bb = load_backbone(ModelConfig(name=tiny_decoders[family]), 4, seed=0)
    bb.model.eval()
    text = "late goal"
    alone = bb.tokenizer([text], return_tensors="pt")
    padded = bb.tokenizer([text, text + " and more words after it"], padding="max_length", max_length=16,
                          truncation=True, return_tensors="pt")
    assert padded["attention_mask"][0].sum() < 16
    assert torch.allclose(bb.model(**alone).logits[0], bb.model(**padded).logits[0], atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_a_decoder_layer_running_one_block_adds_nothing_for_the_other(tiny_decoders, family):
    """Skipping a block equals zeroing its output projection (and bias): the residual passes unchanged."""
    bb = load_backbone(ModelConfig(name=tiny_decoders[family]), 4, seed=0)
    bb.model.eval()
    ids = torch.randint(1000, 2000, (2, 6), generator=torch.Generator().manual_seed(0))
    for block, proj in zip(("ffn", "attn"), OUTPUT_PROJ[family]):
        with running_layers(bb, [0, 1], {1: block}):
            skipped = bb.model(input_ids=ids).logits
        module = bb.layers[1].get_submodule(proj)
        saved = {n: p.clone() for n, p in module.named_parameters()}
        for p in module.parameters():
            p.zero_()
        zeroed = bb.model(input_ids=ids).logits
        for n, p in module.named_parameters():
            p.copy_(saved[n])
        assert torch.allclose(skipped, zeroed, atol=1e-5)
        assert not torch.allclose(skipped, bb.model(input_ids=ids).logits)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
@pytest.mark.parametrize("family", DECODERS)
def test_a_lazy_decoder_reads_its_layers_from_the_causal_lm_checkpoint(tiny_decoders, family, task):
    full = load_backbone(ModelConfig(name=tiny_decoders[family]), 4, seed=0, task=task)
    lazy = load_backbone(ModelConfig(name=tiny_decoders[family]), 4, seed=0, resident=False, task=task)
    hold(lazy, [1], {1: "attn"})
    ffn = OUTPUT_PROJ[family][1].split(".")[0]
    assert next(lazy.layers[0].parameters()).device.type == "meta"
    assert next(lazy.layers[1].get_submodule(ffn).parameters()).device.type == "meta"
    attn = OUTPUT_PROJ[family][0].split(".")[0]
    for (name, a), (_, b) in zip(lazy.layers[1].get_submodule(attn).named_parameters(),
                                 full.layers[1].get_submodule(attn).named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_a_round_on_a_decoder(tiny_decoders, tmp_path, name):
    cfg = from_dict(tiny_config(tiny_decoders["llama"], rounds=1, **{"strategy.name": name}))
    summary = run_inprocess(cfg, tmp_path, quiet=True)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert summary["rounds"] == 1 and not summary["failures"]
    assert 0 <= row["accuracy"] <= 1 and row["bytes_up"] > 0


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "mistral", "phi"])
def test_fine_grained_pruning_runs_on_each_decoder_family(tiny_decoders, tmp_path, family):
    cfg = from_dict(tiny_config(tiny_decoders[family], rounds=1, **{"strategy.name": "fedpruner_fine"}))
    assert not run_inprocess(cfg, tmp_path, quiet=True)["failures"]
