"""Per-layer aggregation of LoRA factors.

Scaling convention: every device uses the same scaling ``s = alpha / r`` (a layer's alpha is
scaled with its rank, so ``alpha_l / r_l`` is constant), hence a device's weight update for one
module is ``dW = s * B @ A`` with ``B`` of shape (out, r) and ``A`` of shape (r, in).  Because
``s`` is common to all devices it factors out of every rule here: they work on the factors and
their products directly, and the caller applies ``s`` once.

The global state holds each module's factors at the maximum rank ``R``; a device with rank ``r``
receives the slice ``A[:r]``, ``B[:, :r]``.  Methods:

- ``fedavg``: equal ranks only; weighted average of A and of B.
- ``pad``: zero-pad to ``R``; rank-row ``k`` is averaged over the devices that own it
  (rank > k), weights renormalised per row.
- ``hetlora``: zero-padded average with weights ``weight_i * ||B_i A_i||_F``; a device's rank
  truncation is the slice it receives.
- ``flexlora``: SVD of the weighted average of the full products ``B_i A_i``, split so that any
  slice ``A[:r]``, ``B[:, :r]`` is the best rank-r approximation (Eckart-Young).

Rows (rank components) that no contributing device owns, modules no device sent and layers
nobody trained keep their current value.  Inputs are never mutated; results are float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from testbed.core.errors import TestbedError
from testbed.core.plan import HeadState, LayerState, LoraState, Update


@dataclass
class Contribution:
    """One device's LoRA factors for ONE layer, with its aggregation weight."""

    weight: float  # samples x fraction of steps the layer was active (0 = ignored)
    factors: LayerState  # "<module>.A" (r, in), "<module>.B" (out, r)


class _Factors(NamedTuple):
    weight: float
    A: Tensor  # (r, in), float32
    B: Tensor  # (out, r), float32


Rule = Callable[[Tensor, Tensor, list[_Factors]], tuple[Tensor, Tensor]]


def contributions(updates: list[Update]) -> dict[int, list[Contribution]]:
    """Per layer: each device's factors, weighted by samples x fraction of steps the layer was active."""
    per_layer: dict[int, list[Contribution]] = {}
    for u in updates:
        for layer, factors in u.lora.items():
            weight = u.samples * u.active_steps.get(layer, 0) / max(u.steps, 1)
            if weight > 0:
                per_layer.setdefault(layer, []).append(Contribution(weight, factors))
    return per_layer


def aggregate(current: LoraState, per_layer: dict[int, list[Contribution]],
              method: str = "fedavg") -> LoraState:
    """Aggregate every layer in ``per_layer``; the other layers keep their value."""
    unknown = sorted(set(per_layer) - set(current))
    if unknown:
        raise ValueError(f"contributions for layers {unknown} that the global state lacks")
    return {layer: aggregate_layer(state, per_layer.get(layer, []), method)
            for layer, state in current.items()}


def aggregate_layer(current: LayerState, contribs: list[Contribution],
                    method: str = "fedavg") -> LayerState:
    """New factors of one layer from ``current`` (at max rank R) and the devices' factors."""
    rule = _rule(method)
    live = [c for c in contribs if _checked_weight(c) > 0]
    _check_known(current, live)
    result = {name: t.to(torch.float32, copy=True) for name, t in current.items()}
    for module in _modules(current):
        parts = _parts(module, live)
        if parts:
            A0, B0 = result[f"{module}.A"], result[f"{module}.B"]
            _check_shapes(module, A0, B0, parts)
            result[f"{module}.A"], result[f"{module}.B"] = rule(A0, B0, parts)
    return result


def average_head(heads: list[tuple[float, HeadState]]) -> HeadState:
    """Weighted average of the classifier head parameters."""
    live = [(w, head) for w, head in heads if w > 0]
    if not live:
        raise ValueError("no head with a positive weight to average")
    total = sum(w for w, _ in live)
    names = live[0][1].keys()
    if any(head.keys() != names for _, head in live):
        raise ValueError("heads to average have different parameter names")
    return {name: sum(w * head[name].float() for w, head in live) / total for name in names}


def _rule(method: str) -> Rule:
    rules: dict[str, Rule] = {"fedavg": _fedavg, "pad": _pad, "hetlora": _hetlora,
                              "flexlora": _flexlora}
    if method not in rules:
        raise TestbedError(f"unknown aggregation method {method!r}; choose one of {sorted(rules)}")
    return rules[method]


def _checked_weight(c: Contribution) -> float:
    if not math.isfinite(c.weight) or c.weight < 0:
        raise ValueError(f"contribution weight must be finite and >= 0, got {c.weight}")
    return c.weight


def _modules(layer: LayerState) -> list[str]:
    return [name[:-2] for name in layer if name.endswith(".A")]


def _parts(module: str, contribs: list[Contribution]) -> list[_Factors]:
    """The float32 factors of ``module`` from the devices that sent it."""
    return [_Factors(c.weight, c.factors[f"{module}.A"].float(), c.factors[f"{module}.B"].float())
            for c in contribs if f"{module}.A" in c.factors]


def _check_known(current: LayerState, contribs: list[Contribution]) -> None:
    extra = sorted({name for c in contribs for name in c.factors} - set(current))
    if extra:
        raise ValueError(f"contributed tensors {extra} are not in the global layer state")


def _check_shapes(module: str, A0: Tensor, B0: Tensor, parts: list[_Factors]) -> None:
    for p in parts:
        (r, n_in), (n_out, r_b) = p.A.shape, p.B.shape
        if n_in != A0.shape[1] or n_out != B0.shape[0] or r != r_b:
            raise ValueError(f"{module}: factors A{(r, n_in)}, B{(n_out, r_b)} do not fit "
                             f"the global A{tuple(A0.shape)}, B{tuple(B0.shape)}")


def _fedavg(A0: Tensor, B0: Tensor, parts: list[_Factors]) -> tuple[Tensor, Tensor]:
    ranks = sorted({p.A.shape[0] for p in parts})
    if len(ranks) > 1:
        raise TestbedError(f"aggregation method 'fedavg' needs equal LoRA ranks, got {ranks}; "
                           "use a heterogeneous method (pad, hetlora, flexlora)")
    # With one rank, the per-row average over owners is the plain weighted mean.
    return _padded_mean(A0, B0, parts, per_row=True)


def _pad(A0: Tensor, B0: Tensor, parts: list[_Factors]) -> tuple[Tensor, Tensor]:
    return _padded_mean(A0, B0, parts, per_row=True)


def _hetlora(A0: Tensor, B0: Tensor, parts: list[_Factors]) -> tuple[Tensor, Tensor]:
    # HetLoRA weighs each update by its Frobenius norm; we multiply by the device's weight so
    # that sample counts still matter (equal weights give the paper's rule).  If every product
    # is zero (B still at its zero init) the norms say nothing and the plain weights are used.
    norms = [float(torch.linalg.matrix_norm(p.B @ p.A)) for p in parts]
    if sum(norms) > 0:
        parts = [p._replace(weight=p.weight * n) for p, n in zip(parts, norms)]
    return _padded_mean(A0, B0, parts, per_row=False)


def _padded_mean(A0: Tensor, B0: Tensor, parts: list[_Factors],
                 per_row: bool) -> tuple[Tensor, Tensor]:
    """Weighted mean of the factors zero-padded to rank R.

    ``per_row``: divide rank-row k by the weight of the devices owning it; otherwise by the
    total weight, so non-owners count as zeros.  Rows nobody owns keep ``A0``/``B0``.
    """
    R = A0.shape[0]
    if any(p.A.shape[0] > R for p in parts):
        raise ValueError(f"a contribution's rank exceeds the global rank {R}")
    sum_A, sum_B, owner_w = torch.zeros_like(A0), torch.zeros_like(B0), torch.zeros(R)
    for p in parts:
        r = p.A.shape[0]
        sum_A[:r] += p.weight * p.A
        sum_B[:, :r] += p.weight * p.B
        owner_w[:r] += p.weight
    owned = owner_w > 0
    denom = owner_w if per_row else torch.full((R,), sum(p.weight for p in parts))
    denom = torch.where(owned, denom, torch.ones(R))
    A = torch.where(owned[:, None], sum_A / denom[:, None], A0)
    B = torch.where(owned[None, :], sum_B / denom[None, :], B0)
    return A, B


def _flexlora(A0: Tensor, B0: Tensor, parts: list[_Factors]) -> tuple[Tensor, Tensor]:
    total = sum(p.weight for p in parts)
    dW = sum(p.weight * (p.B.double() @ p.A.double()) for p in parts) / total  # (out, in)
    # SVD of the (out, in) product itself: U spans outputs (B), Vh spans inputs (A).
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    k = min(A0.shape[0], S.numel())
    root = S[:k].sqrt()
    A, B = torch.zeros_like(A0), torch.zeros_like(B0)
    A[:k] = (root[:, None] * Vh[:k]).float()
    B[:, :k] = (U[:, :k] * root).float()
    return A, B

