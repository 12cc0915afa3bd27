"""Layer analysis for FedPruner: linear CKA between layer outputs, and layer importance.

Runs the model (with a LoRA state) on a probe batch.  Hidden states are compared token by
token (padding excluded).  Importance of a layer: the loss increase when it is skipped
(`loss`), or 1 - cosine similarity between its input and its output (`cosine`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from testbed.config import LoraConfig
from testbed.model import Backbone, lora_applied, running_layers, set_head, set_lora
from testbed.plan import HeadState, LoraState


@dataclass
class LayerProbe:
    cka: list[list[float]]  # (L, L): linear CKA between layer outputs
    importance: dict[str, list[float]]  # "loss" and "cosine": one value per layer


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) between two (n, d) representations."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = torch.linalg.norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)).clamp_min(1e-12))


@torch.no_grad()
def probe_layers(bb: Backbone, lora: LoraState, head: HeadState, batch: dict[str, torch.Tensor],
                 lora_cfg: LoraConfig) -> LayerProbe:
    ranks = {l: next(t.shape[0] for n, t in ts.items() if n.endswith(".A")) for l, ts in lora.items()}
    mask = batch["attention_mask"].bool()
    n = bb.num_layers
    with lora_applied(bb, ranks, lora_cfg) as model:
        if lora:
            set_lora(bb, model, lora)
        set_head(bb, head)
        model.eval()
        out = model(**batch, output_hidden_states=True)
        states = [h[mask].float() for h in out.hidden_states]  # L + 1: the embeddings, then each layer
        base = out.loss.item()
        loss_gain = []
        for layer in range(n):
            with running_layers(bb, [l for l in range(n) if l != layer]):
                loss_gain.append(max(model(**batch).loss.item() - base, 0.0))
    outputs = states[1:]
    cka = [[linear_cka(a, b) for b in outputs] for a in outputs]
    cosine = [float(1 - torch.nn.functional.cosine_similarity(states[l], states[l + 1], dim=-1).mean())
              for l in range(n)]
    return LayerProbe(cka, {"loss": loss_gain, "cosine": cosine})
