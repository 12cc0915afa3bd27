"""A tiny random BERT saved like a real checkpoint, and a config that runs it in seconds: for
trying the machinery (transports, faults, deployment) where the model's quality does not matter."""
from __future__ import annotations

from pathlib import Path

import torch

from testbed.model.load import resolve_model_path


def save_tiny_bert(path: Path, hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int = 64,
                   positions: int = 128) -> str:
    """A random BERT (by default 2 layers, hidden 32) with the bundled MiniLM tokenizer, saved
    at `path`; returns it as a model name for the config."""
    from transformers import (AutoTokenizer, BertConfig,
                              BertForSequenceClassification)

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=positions)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_config(model_path: str, **overrides) -> dict:
    """A complete config dict for a fast in-process run of `model_path` on synthetic data;
    `overrides` are dotted keys (`**{"train.local_steps": 2}`) or sections."""
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
