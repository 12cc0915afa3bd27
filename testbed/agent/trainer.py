"""Local training of one plan on one device's shard."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from testbed.core.config import LoraConfig, TrainConfig
from testbed.core.errors import OutOfMemory, TestbedError
from testbed.core.plan import BOTH, HeadState, LoraState, Plan
from testbed.data import Tokens
from testbed.measure.memory import MIB, SavedTensorCounter, training_footprint
from testbed.model.backbone import Backbone
from testbed.model.layers import running_layers
from testbed.model.lora import (freeze_lora, get_head, get_lora, lora_applied,
                                set_head, set_lora)


@dataclass
class TrainResult:
    lora: LoraState  # every layer that carried LoRA, personal ones included
    head: HeadState
    active_steps: dict[int, int]
    loss: float
    compute_s: float
    step_s: float
    footprint_mb: float  # at the step with the most saved activations
    footprint_mean_mb: float  # averaged over steps (layer dropout varies it)


def batches(indices: list[int], steps: int, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """`steps` batches drawn without replacement, reshuffling when the shard runs out."""
    out, pool = [], []
    for _ in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not pool:
                pool = [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
            batch.append(pool.pop())
        out.append(batch)
    return out


def train_plan(bb: Backbone, plan: Plan, lora: LoraState, head: HeadState, tokens: Tokens,
               indices: list[int], lora_cfg: LoraConfig, train_cfg: TrainConfig, seed: int,
               budget_mb: float = 0.0) -> TrainResult:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # model dropout
    resident = plan.resident(bb.num_layers)
    ranks = {l: plan.ranks.get(l, 0) for l in resident}
    for l in plan.adapted(bb.num_layers):  # LoRA in a block that does not run would never train
        if plan.block(l) != BOTH and any(bb.block_of(m) != plan.block(l) for m in bb.modules[l]):
            raise TestbedError(f"plan: layer {l} carries LoRA outside its {plan.block(l)} block, which alone runs")
    active_steps = {l: 0 for l in resident}
    losses, times, saved = [], [], []
    place, scaler = bb.placement, bb.placement.scaler()
    with lora_applied(bb, ranks, lora_cfg) as model:
        if any(ranks.values()):
            set_lora(bb, model, lora)
        set_head(bb, head)
        freeze_lora(bb, model, plan.frozen)
        for p in bb.head_params().values():
            p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=train_cfg.weight_decay)
        model.train()
        counter = SavedTensorCounter(model)
        with running_layers(bb, resident, plan.blocks):  # pruned layers and blocks are not part of the model
            fixed = training_footprint(model, 0)
        start = time.perf_counter()
        for batch in batches(indices, plan.local_steps, plan.batch_size, gen):
            t0 = time.perf_counter()
            keep = [l for l in resident if torch.rand((), generator=gen).item() >= plan.drop.get(l, 0.0)]
            if plan.max_active and len(keep) > plan.max_active:  # a random subset of the drawn layers runs
                keep = sorted(keep[i] for i in torch.randperm(len(keep), generator=gen)[: plan.max_active].tolist())
            with running_layers(bb, keep, plan.blocks), counter, place.autocast():
                loss = model(**place.inputs(tokens.take(batch))).loss
            if loss.requires_grad:  # else nothing trainable ran: a causal LM (no head) with its LoRA layers skipped
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
            for l in keep:
                active_steps[l] += 1
            losses.append(loss.item())
            saved.append(counter.bytes)
            if budget_mb and (fixed + counter.bytes) / MIB > budget_mb:
                raise OutOfMemory(f"training needs {(fixed + counter.bytes) / MIB:.1f} MiB, "
                                  f"the budget is {budget_mb:g} MiB")
            times.append(time.perf_counter() - t0)
        compute_s = time.perf_counter() - start
        trained = get_lora(bb, model) if any(ranks.values()) else {}
        result = TrainResult(trained, get_head(bb), active_steps, statistics.fmean(losses),
                             compute_s, statistics.median(times), (fixed + max(saved)) / MIB,
                             (fixed + statistics.fmean(saved)) / MIB)
    return result
