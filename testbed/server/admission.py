"""Admission of an update before aggregation: it must be exactly what its plan asked for.

A device (buggy or hostile) could send extra layers, other ranks, a head of another shape,
non-finite values or an inflated sample count; any of these would corrupt the global state
or tilt the weighted average.  The aggregator refuses such an update and records why.
"""
from __future__ import annotations

import logging
import math

import torch

from testbed.comm.transport import Failure, RoundResult
from testbed.core.plan import HeadState, Plan, Update
from testbed.model.info import ModelInfo

log = logging.getLogger("testbed.aggregator")


def admit(r: int, plans: dict[str, Plan], result: RoundResult, info: ModelInfo, head: HeadState,
          shard_sizes: dict[str, int]) -> list[Update]:
    """The round's updates that are exactly what their plans asked for; the rest become failures."""
    out = []
    for d, plan in plans.items():
        if d not in result.updates:
            continue
        u = result.updates[d]
        problem = check_update(u, plan, info, head, shard_sizes[d])
        if problem:
            log.warning("round %d: rejected the update of %s: %s", r, d, problem)
            result.failures.append(Failure(r, d, "rejected", problem))
        else:
            out.append(u)
    return out


def check_update(update: Update, plan: Plan, info: ModelInfo, head: HeadState, shard_size: int) -> str | None:
    """None if the update is admissible, else the reason it is not."""
    shared = set(plan.shared(info.num_layers))
    if extra := sorted(set(update.lora) - shared):
        return f"layers {extra} were not asked for (the plan shares {sorted(shared)})"
    for layer, tensors in sorted(update.lora.items()):
        r = plan.ranks[layer]
        expected = {}
        for m in info.modules[layer]:
            out_f, in_f = info.shapes[m]
            expected[f"{m}.A"], expected[f"{m}.B"] = (r, in_f), (out_f, r)
        if set(tensors) != set(expected):
            return f"layer {layer}: tensors {sorted(tensors)} instead of {sorted(expected)}"
        for name, t in tensors.items():
            if tuple(t.shape) != expected[name]:
                return f"layer {layer} {name}: shape {tuple(t.shape)}, the plan's rank {r} needs {expected[name]}"
            if not torch.isfinite(t).all():
                return f"layer {layer} {name}: NaN or Inf"
    if set(update.head) != set(head):
        return f"head tensors {sorted(update.head)} instead of {sorted(head)}"
    for name, t in update.head.items():
        if t.shape != head[name].shape:
            return f"head {name}: shape {tuple(t.shape)} instead of {tuple(head[name].shape)}"
        if not torch.isfinite(t).all():
            return f"head {name}: NaN or Inf"
    if not 0 < update.samples <= shard_size:
        return f"claims {update.samples} samples; its shard holds {shard_size}"
    if update.steps != plan.local_steps or any(not 0 <= n <= update.steps for n in update.active_steps.values()):
        return f"step counts do not match the plan's {plan.local_steps} local steps"
    if not math.isfinite(update.loss):
        return "non-finite training loss"
    return check_probe(update, plan, info.num_layers)


def check_probe(update: Update, plan: Plan, num_layers: int) -> str | None:
    """A probe exactly when the plan asked for one: U x U CKA and one finite importance per unit."""
    if update.probe is None:
        return "lacks the probe its plan asked for" if plan.probe_rows else None
    if not plan.probe_rows:
        return "sent a probe its plan did not ask for"
    units = num_layers * (2 if plan.probe_blocks else 1)
    probe = update.probe
    values = [v for row in probe.cka for v in row] + [v for vs in probe.importance.values() for v in vs]
    if probe.blocks != plan.probe_blocks or len(probe.cka) != units or set(probe.importance) != {"loss", "cosine"} \
            or any(len(vs) != units for vs in probe.importance.values()):
        return f"probe of the wrong units (the plan's model has {units})"
    if not all(math.isfinite(v) for v in values):
        return "probe with NaN or Inf"
    return None
