"""Bytes autograd saves per token, measured once per model: the cost model's activation terms."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from testbed.measure.memory import SavedTensorCounter


@dataclass
class Activations:
    """Bytes autograd saves per token: per layer at or above the lowest LoRA layer, and fixed;
    per layer running one block only ("attn", "ffn"; where the model family's blocks are known)."""

    per_layer: float
    fixed: float
    per_block: dict[str, float] = field(default_factory=dict)

def measure_activations(bb, lora_cfg, seq_len: int, batch: int = 2) -> Activations:
    """Count saved bytes for one step with LoRA on every layer, on the top layer only, and on every
    layer running its attention block alone."""
    from testbed.model.layers import running_layers
    from testbed.model.lora import lora_applied

    # Padding makes the attention take an explicit mask, which saves more than a batch without any
    # (training pads to max_length): the first row is full, the others half padding.
    ids = torch.full((batch, seq_len), 1000 % bb.model.config.vocab_size, dtype=torch.long)
    ids[1:, seq_len // 2:] = bb.model.config.pad_token_id or 0
    mask = torch.ones_like(ids)
    mask[1:, seq_len // 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": bb.stand_in_labels(ids)}
    n, saved = bb.num_layers, []
    every = list(range(n))
    runs = [(every, None), ([n - 1], None)] + ([(every, dict.fromkeys(every, "attn"))] if bb.blocks else [])
    for layers, blocks in runs:
        with lora_applied(bb, {l: lora_cfg.rank for l in layers}, lora_cfg) as model:
            model.train()  # as in training: dropout masks are saved too (their sizes do not depend on the RNG)
            with SavedTensorCounter(model) as counter, running_layers(bb, every, blocks), bb.placement.autocast():
                model(**bb.placement.inputs(inputs)).loss
            saved.append(counter.bytes / (batch * seq_len))
    per_layer = (saved[0] - saved[1]) / max(n - 1, 1)
    fixed = max(saved[1] - per_layer, 0.0)
    per_block = {}
    if bb.blocks:
        attn = min(max((saved[2] - fixed) / n, 0.0), per_layer)
        per_block = {"attn": attn, "ffn": per_layer - attn}
    return Activations(per_layer=per_layer, fixed=fixed, per_block=per_block)
