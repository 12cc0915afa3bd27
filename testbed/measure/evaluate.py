"""Evaluation of a LoRA state on a token set: all layers (or a submodel's) run, no dropout."""
from __future__ import annotations

import torch

from testbed.core.config import LoraConfig
from testbed.core.plan import HeadState, LoraState
from testbed.data import Tokens
from testbed.model.backbone import Backbone
from testbed.model.layers import running_layers
from testbed.model.lora import lora_applied, set_head, set_lora


@torch.no_grad()
def evaluate(bb: Backbone, lora: LoraState, head: HeadState, tokens: Tokens, lora_cfg: LoraConfig,
             batch_size: int, indices: list[int] | None = None, layers: list[int] | None = None,
             blocks: dict[int, str] | None = None) -> dict[str, float]:
    idx = list(range(len(tokens))) if indices is None else indices
    keep = list(range(bb.num_layers)) if layers is None else layers
    ranks = {l: next(t.shape[0] for n, t in ts.items() if n.endswith(".A")) for l, ts in lora.items()}
    correct, loss_sum = 0, 0.0
    with lora_applied(bb, ranks, lora_cfg) as model:
        if lora:
            set_lora(bb, model, lora)
        set_head(bb, head)
        model.eval()
        with running_layers(bb, keep, blocks), bb.placement.autocast():
            for start in range(0, len(idx), batch_size):
                batch = bb.placement.inputs(tokens.take(idx[start:start + batch_size]))
                out = model(**batch)
                loss_sum += out.loss.item() * len(batch["labels"])
                correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    return {"accuracy": correct / max(len(idx), 1), "loss": loss_sum / max(len(idx), 1)}
