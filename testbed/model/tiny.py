"""Tiny random models saved like real checkpoints, and a config that runs one in seconds: for
trying the machinery (transports, faults, deployment, decoders, tasks) where the model's quality
does not matter."""
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


DECODERS = ("llama", "qwen2", "gpt2", "mistral", "phi")  # the families save_tiny_decoder makes

# A chat template in the usual shape (a turn marker, the role, the content, the end of turn),
# written with special tokens of MiniLM's vocabulary so that each marker is one token.
CHAT_TEMPLATE = ("{% for m in messages %}[MASK] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}[MASK] assistant : {% endif %}")


def decoder_tokenizer():
    """MiniLM's vocabulary made into a decoder's tokenizer: a BOS token in front of every text,
    an EOS token, no pad token (as decoders ship) and a chat template."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B",
                                                           special_tokens=[("[CLS]", base.cls_token_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]")
    tok.pad_token = None
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_decoder(path: Path, family: str = "llama", hidden: int = 32, layers: int = 2, heads: int = 2,
                      intermediate: int = 64, positions: int = 128) -> str:
    """A random causal LM of a decoder family (DECODERS), by default 2 layers of hidden
    32, saved at `path` as its family's causal-LM checkpoint with `decoder_tokenizer`; returns it
    as a model name for the config.  (transformers loads a qwen2 model's tokenizer as its own
    class, which splits this vocabulary's words into letters: longer sequences, same machinery.)"""
    from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig,
                              MistralConfig, PhiConfig, Qwen2Config)

    tok = decoder_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate, n_positions=positions,
                         **ids)
    elif family in ("llama", "qwen2", "mistral", "phi"):
        config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "phi": PhiConfig}[family]
        cfg = config_class(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, intermediate_size=intermediate,
                           max_position_embeddings=positions, tie_word_embeddings=True, **ids)
    else:
        raise ValueError(f"no tiny decoder of family {family!r} (known: {', '.join(DECODERS)})")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
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
