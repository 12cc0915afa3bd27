"""Layer analysis for FedPruner: linear CKA between unit outputs, and unit importance.

Runs the model (with a LoRA state) on a probe batch.  Units are the layers, or each layer's
attention block and FFN block (the stream after the attention block is caught as the input
of the FFN block's first module).  Hidden states are compared token by token (padding
excluded).  Importance of a unit: the loss increase when it is skipped (`loss`), or
1 - cosine similarity between its input and its output (`cosine`).

The probe holds the whole model, with every unit's output and their float copies for the CKA,
while it runs: `probe_layers` also returns those bytes, counted as the training footprint is
(tensors held, at their own dtypes), with a pass's logits and the loss's log-probabilities of
the same size on top of the kept output's.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from testbed.core.config import LoraConfig
from testbed.core.plan import BOTH, HeadState, LayerProbe, LoraState
from testbed.measure.memory import nbytes
from testbed.model.backbone import Backbone
from testbed.model.layers import running_layers
from testbed.model.lora import lora_applied, set_head, set_lora

__all__ = ["LayerProbe", "linear_cka", "probe_layers", "units"]


def units(num_layers: int, blocks: bool) -> list[tuple[int, str]]:
    """The probe's units in order: layers, or (layer, "attn"), (layer, "ffn") for each layer."""
    return [(l, b) for l in range(num_layers) for b in (("attn", "ffn") if blocks else (BOTH,))]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) between two (n, d) representations."""
    return cka_matrix([x, y])[0][1]


def cka_matrix(states: list[torch.Tensor]) -> list[list[float]]:
    """Linear CKA between every pair of (n, d) representations.  Each is centred and its
    self-similarity taken once, and each pair once (CKA is symmetric): on a 30-layer model that
    is 465 cross products where pairing naively makes 2700."""
    centred = [s - s.mean(0, keepdim=True) for s in states]
    norms = [torch.linalg.norm(c.T @ c) for c in centred]
    k = len(states)
    out = [[1.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1, k):
            cross = torch.linalg.norm(centred[j].T @ centred[i]) ** 2
            out[i][j] = out[j][i] = float(cross / (norms[i] * norms[j]).clamp_min(1e-12))
    return out


@contextlib.contextmanager
def after_attention(bb: Backbone, enabled: bool) -> Iterator[dict[int, torch.Tensor]]:
    """Per layer, the residual stream after its attention block (the FFN block's input)."""
    caught: dict[int, torch.Tensor] = {}
    hooks = []
    if enabled:
        first_ffn = next(iter(bb.blocks["ffn"]))
        for l, layer in enumerate(bb.layers):
            hooks.append(layer.get_submodule(first_ffn).register_forward_pre_hook(
                lambda m, args, l=l: caught.__setitem__(l, args[0])))
    try:
        yield caught
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def probe_layers(bb: Backbone, lora: LoraState, head: HeadState, batch: dict[str, torch.Tensor],
                 lora_cfg: LoraConfig, blocks: bool = False) -> tuple[LayerProbe, int]:
    """The probe, and the bytes it held at its peak (see the module's docstring)."""
    ranks = {l: next(t.shape[0] for n, t in ts.items() if n.endswith(".A")) for l, ts in lora.items()}
    batch = bb.placement.inputs(batch)
    mask = batch["attention_mask"].bool()
    n = bb.num_layers
    with lora_applied(bb, ranks, lora_cfg) as model, bb.placement.autocast():
        if lora:
            set_lora(bb, model, lora)
        set_head(bb, head)
        model.eval()
        with after_attention(bb, blocks) as mid:
            out = model(**batch, output_hidden_states=True)
        hidden = out.hidden_states  # L + 1: the embeddings, then each layer
        states = [hidden[0]] + [s for l in range(n) for s in ((mid[l], hidden[l + 1]) if blocks else (hidden[l + 1],))]
        states = [s[mask].float() for s in states]
        held = (nbytes(model.parameters()) + nbytes(hidden) + nbytes(mid.values()) + nbytes(states)
                + 3 * nbytes([out.logits]))
        base = out.loss.item()
        loss_gain = []
        for layer, block in units(n, blocks):
            if block == BOTH:
                skipped = running_layers(bb, [l for l in range(n) if l != layer])
            else:  # run the layer's other block only
                skipped = running_layers(bb, list(range(n)), {layer: "ffn" if block == "attn" else "attn"})
            with skipped:
                loss_gain.append(max(model(**batch).loss.item() - base, 0.0))
    outputs = states[1:]
    cka = cka_matrix(outputs)
    cosine = [float(1 - torch.nn.functional.cosine_similarity(states[u], states[u + 1], dim=-1).mean())
              for u in range(len(outputs))]
    return LayerProbe(cka, {"loss": loss_gain, "cosine": cosine}, blocks), held
