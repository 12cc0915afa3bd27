"""What differs between model families: default LoRA targets, and a layer's attention and FFN blocks."""
from __future__ import annotations

import torch
from torch import nn

# LoRA targets for `targets: auto` where peft's own table lacks the family.
EXTRA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "phi3": ["qkv_proj"]}


def default_targets(model_type: str) -> list[str] | None:
    """Modules inside a layer that carry LoRA when the config says `targets: auto`: peft's
    default for the family (what `LoraConfig` would pick), else ours, else None."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    targets = PEFT_TARGETS.get(model_type) or EXTRA_TARGETS.get(model_type)
    return list(targets) if targets else None


# Per family: a layer's attention and FFN blocks, as its child modules, each with the stand-in
# that replaces it when its block is skipped (see `_Skip`).
_BERT_BLOCKS = {"attn": {"attention": "attention"}, "ffn": {"intermediate": "identity", "output": "residual"}}

_LLAMA_BLOCKS = {"attn": {"input_layernorm": "identity", "self_attn": "zero_attention"},
                 "ffn": {"post_attention_layernorm": "identity", "mlp": "zero"}}

_GPT2_BLOCKS = {"attn": {"ln_1": "identity", "attn": "zero_attention"}, "ffn": {"ln_2": "identity", "mlp": "zero"}}

# Phi runs attention and MLP side by side on one normalised input, both added to the stream:
# the shared input_layernorm stays whichever block is skipped.
_PHI_BLOCKS = {"attn": {"self_attn": "zero_attention"}, "ffn": {"mlp": "zero"}}

BLOCKS = {"bert": _BERT_BLOCKS, "roberta": _BERT_BLOCKS, "llama": _LLAMA_BLOCKS, "qwen2": _LLAMA_BLOCKS,
          "mistral": _LLAMA_BLOCKS, "gpt2": _GPT2_BLOCKS, "phi": _PHI_BLOCKS}

class _Skip(nn.Module):
    """Stands in for a skipped block's child module; the residual stream passes unchanged.

    BERT: the attention block's output *is* the stream (``attention``: return the input), and
    its FFN ends in LayerNorm(dense(h) + input) (``identity`` for the intermediate, ``residual``:
    return the input for the output).  LLaMA and GPT-2: blocks add to the residual (``zero``).
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if self.kind == "attention":
            return x, None
        if self.kind == "residual":
            return args[1]
        if self.kind == "zero":
            return torch.zeros_like(x)
        if self.kind == "zero_attention":
            return torch.zeros_like(x), None
        return x
