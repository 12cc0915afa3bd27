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
    """Options of one token each (label words, letters) are chosen in the loss's own pass: the
    logits at a prompt's last position score them, as a pass over the prompt alone would (a causal
    model's earlier positions do not see later tokens).  Longer options take a scoring pass."""
    loss_sum, counted, chosen = 0.0, 0, []
    single = tokens.choices is not None and all(len(o) == 1 for o in tokens.choices.options)
    for start in range(0, len(idx), batch_size):
        rows = idx[start:start + batch_size]
        batch = placement.inputs(tokens.take(rows))
        targets = int((batch["labels"][:, 1:] != -100).sum())  # the model's loss is their mean
        out = model(**batch)
        loss_sum += out.loss.item() * targets
        counted += targets
        if single:
            chosen.append(first_token_scores(out.logits, tokens, rows).argmax(-1))
    loss = loss_sum / max(counted, 1)
    accuracy = None
    if tokens.choices is not None and idx:
        chosen = torch.cat(chosen) if single else choose(model, tokens, idx, pad_id, batch_size, placement.device)
        accuracy = (chosen == tokens.choices.answers[idx]).float().mean().item()
    return {"accuracy": accuracy, "loss": loss, "perplexity": math.exp(min(loss, 50.0))}  # finite if diverged


def first_token_scores(logits: torch.Tensor, tokens: Tokens, rows: list[int]) -> torch.Tensor:
    """(rows, options): log p(option | prompt) of one-token options, from the logits at each
    row's last prompt position."""
    last = (tokens.choices.prompt_lengths[rows] - 1).to(logits.device)
    options = torch.tensor([o[0] for o in tokens.choices.options], device=logits.device)
    at_last = logits[torch.arange(len(rows), device=logits.device), last].float().log_softmax(-1)
    return at_last[:, options].cpu()
