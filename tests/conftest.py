"""Shared fixtures: tiny random models saved like real ones, the AG News sample."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
AG_NEWS = ROOT.parent / "shared" / "data" / "ag_news"


def save_tiny_bert(path: Path, hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int = 64,
                   positions: int = 128) -> str:
    """A random BERT (by default 2 layers, hidden 32) with the bundled MiniLM tokenizer, saved
    as a local model path."""
    from transformers import (AutoTokenizer, BertConfig,
                              BertForSequenceClassification)

    from testbed.model.load import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=positions)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 16-layer random LLaMA-style model (hidden 256: 4 MB of weights per layer, 60 % of the
    model in its layers) with the bundled tokenizer, saved as a local model path."""
    from transformers import (AutoTokenizer, LlamaConfig,
                              LlamaForSequenceClassification)

    from testbed.model.load import resolve_model_path

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=1024, num_hidden_layers=16,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def ag_news() -> Path:
    if not (AG_NEWS / "train.csv").is_file():
        pytest.skip(f"the AG News sample is not at {AG_NEWS}")
    return AG_NEWS


def tiny_config(model_path: str, **overrides) -> dict:
    """A complete config dict for a fast in-process run on a tiny model."""
    cfg = {
        "seed": 0, "rounds": 2, "eval_every": 1, "target_accuracy": 0.5, "clock": "modelled",
        "strategy": {"name": "fedlora"},
        "model": {"name": model_path, "max_length": 16, "threads": 1, "lora": {"rank": 4, "alpha": 8}},
        "data": {"source": "synthetic", "synthetic_train": 200, "synthetic_test": 64},
        "devices": {"laptop": 2, "jetson-tx2": 1},
        "train": {"local_steps": 3, "batch_size": 8, "lr": 1e-3},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg
