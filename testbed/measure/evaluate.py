"""Evaluation of a LoRA state on a token set: all layers (or a submodel's) run, no dropout."""
from __future__ import annotations

import math

import torch
from torch import nn

from testbed.core.config import CAUSAL_LM, LoraConfig
from testbed.core.plan import HeadState, LoraState
from testbed.data import Tokens
from testbed.measure.scoring import choose
from testbed.model.backbone import Backbone
from testbed.model.layers import running_layers
from testbed.model.lora import lora_applied, set_head, set_lora
from testbed.model.placement import Placement


@torch.no_grad()
def evaluate(bb: Backbone, lora: LoraState, head: HeadState, tokens: Tokens, lora_cfg: LoraConfig,
             batch_size: int, indices: list[int] | None = None, layers: list[int] | None = None,
             blocks: dict[int, str] | None = None) -> dict[str, float | None]:
    """Classification: accuracy and mean loss.  Causal LM: the loss per response token, its
    perplexity, and accuracy where responses are a closed set (else None)."""
    idx = list(range(len(tokens))) if indices is None else indices
    keep = list(range(bb.num_layers)) if layers is None else layers
    ranks = {l: next(t.shape[0] for n, t in ts.items() if n.endswith(".A")) for l, ts in lora.items()}
    with lora_applied(bb, ranks, lora_cfg) as model:
        if lora:
            set_lora(bb, model, lora)
        set_head(bb, head)
        model.eval()
        with running_layers(bb, keep, blocks), bb.placement.autocast():
            if bb.task == CAUSAL_LM:
                return language_model_metrics(model, tokens, idx, batch_size, bb.tokenizer.pad_token_id, bb.placement)
            return classification_metrics(model, tokens, idx, batch_size, bb.placement)


def classification_metrics(model: nn.Module, tokens: Tokens, idx: list[int], batch_size: int,
                           placement: Placement) -> dict[str, float]:
    correct, loss_sum = 0, 0.0
    for start in range(0, len(idx), batch_size):
        batch = placement.inputs(tokens.take(idx[start:start + batch_size]))
        out = model(**batch)
        loss_sum += out.loss.item() * len(batch["labels"])
        correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    return {"accuracy": correct / max(len(idx), 1), "loss": loss_sum / max(len(idx), 1)}


def language_model_metrics(model: nn.Module, tokens: Tokens, idx: list[int], batch_size: int,
                           pad_id: int, placement: Placement) -> dict[str, float | None]:
    loss_sum, counted = 0.0, 0
    for start in range(0, len(idx), batch_size):
        batch = placement.inputs(tokens.take(idx[start:start + batch_size]))
        targets = int((batch["labels"][:, 1:] != -100).sum())  # the model's loss is their mean
        loss_sum += model(**batch).loss.item() * targets
        counted += targets
    loss = loss_sum / max(counted, 1)
    accuracy = None
    if tokens.choices is not None and idx:
        chosen = choose(model, tokens, idx, pad_id, batch_size, placement.device)
        accuracy = (chosen == tokens.choices.answers[idx]).float().mean().item()
    return {"accuracy": accuracy, "loss": loss, "perplexity": math.exp(min(loss, 50.0))}  # finite if diverged
