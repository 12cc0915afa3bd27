"""Fixtures: tiny random models saved like real ones."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it

import pytest  # noqa: E402
import torch  # noqa: E402

from testbed.model.tiny import DECODERS, save_tiny_bert, save_tiny_decoder  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory) -> dict[str, str]:
    """A 2-layer random causal LM of each decoder family (llama, qwen2, gpt2), by family."""
    return {f: save_tiny_decoder(tmp_path_factory.mktemp(f"tiny-{f}"), f) for f in DECODERS}


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
