"""CostModel: predicted seconds, memory and bytes of a Plan on a Device.

Strategies reason about devices only through this.
- Bytes: what the wire sends for the plan's messages, computed from their layout (the LoRA
  slices the plan shares, the head, the header), exact up to a few header bytes.
- Memory: the larger of training's and, where the plan asks for one, the device-side probe's
  (the whole model resident, every unit's output kept for the CKA).  Training's: resident
  parameters (the plan's layers plus embeddings and head, at `model.dtype`), float32 LoRA
  weights with their gradients and AdamW state, and the activations saved for backward by the
  layers at or above the lowest LoRA layer (below it nothing is saved).  Saved
  bytes per token are counted once per run on the real model (`measure_activations`, in the
  run's precision: autocast's copies of weights included; on a batch with padding, whose
  attention mask makes attention save more), so the figure holds for the run's sequence
  length; memory is the worst case over dropout (every layer runs, or
  under `max_active` the layers that save the most).
- Time: a DeviceProfile's per-layer seconds (measured by `testbed profile`, or derived from
  FLOPs where no profile fits the model): forward of every layer that runs (with LoRA at the
  plan's rank, or without LoRA), backward only at or above the lowest trained LoRA layer, each
  weighted by the probability the layer runs.  They were measured at one shape (batch b0,
  length L0); at the plan's batch b and the run's length L each is scaled by the profile's
  fitted layer(b, L) / layer(b0, L0), where layer(b, L) = layer_s + token_s x b x L +
  attention_s x b x L^2 (a fixed cost per layer and step, the matmuls per token, attention per
  token and unit of length).  The rest of the step (embeddings, head, optimizer, Python) is
  outside_s + outside_token_s x b x L.  The terms are fitted to whole steps the profiler timed
  at a few shapes (`StepFit`); a profile without them (older files, FLOP-derived ones) scales
  everything linearly in tokens.  The sum is divided by the device's speed factor relative to
  the profiled device, and by its class's speedup in the run's half precision
  (`train.precision`; testbed/core/devices.py).
- Blocks: a layer running only its attention or only its FFN holds that block's parameters
  and saves that block's activations (both counted on the real model); its seconds are the
  layer's times the block's share of the layer's FLOPs (2 x parameters per token, plus the
  attention scores' 4 x length x hidden for the attention block).
- A device-side probe (plan.probe_rows) runs the whole model forward once, then once per unit
  with that unit skipped, on the probe rows: charged at the profile's frozen forward times (the
  skipped units, together one pass of the layers, left out); then the CKA of every pair of units'
  outputs, charged by its FLOPs at the reference's rate (REFERENCE_GFLOPS).
- Validation (plan.validate) runs the device's model forward over its validation rows
  (`Device.val_rows`) before and after training: its resident layers' forward times (with LoRA at
  the plan's rank), embeddings and the head; a causal LM whose options span several tokens
  scores them in a second pass (one-token options are read off the loss's pass).
- Both are forward passes over their rows as one batch, scaled from the profiled shape as a
  layer is: by layer(rows, L) / layer(b0, L0).
- A round is the device's busy seconds (training, probe, validation: every pass the plan asks of
  it) plus its two transfers; nothing the plan asks is free.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from testbed.comm.framing import LENGTH_PREFIX
from testbed.comm.wire import packed_size, plan_message, update_message
from testbed.core.devices import Device, precision_speedup
from testbed.core.plan import (BOTH, HeadState, LayerProbe, LoraState, Plan,
                               Update)
from testbed.measure.activations import Activations
from testbed.measure.memory import MIB
from testbed.measure.profiler import DeviceProfile
from testbed.model.info import ModelInfo

FLOAT_BYTES = 4
REFERENCE_GFLOPS = 106.0  # MiniLM training on the reference (2 threads): 44.7 GFLOP per 0.42 s step


def at_rank(by_rank: dict[int, list[float]], rank: int, layer: int) -> float:
    """A layer's measured seconds at `rank`, interpolated linearly between measured ranks."""
    ranks = sorted(by_rank)
    if rank <= ranks[0] or len(ranks) == 1:
        return by_rank[ranks[0]][layer]
    for lo, hi in zip(ranks, ranks[1:]):
        if rank <= hi:
            w = (rank - lo) / (hi - lo)
            return (1 - w) * by_rank[lo][layer] + w * by_rank[hi][layer]
    return by_rank[ranks[-1]][layer]


@dataclass
class CostModel:
    info: ModelInfo
    seq_len: int
    activations: Activations
    head_shapes: dict[str, tuple[int, ...]]
    profile: DeviceProfile
    wire_dtype: torch.dtype = torch.float32
    base_dtype: torch.dtype = torch.float32  # model.dtype: the frozen base's; LoRA and the head are float32
    precision: str = "fp32"  # train.precision: what a step's matrix products run in
    eval_passes: int = 1  # forward passes a validation row takes: 2 where options of several tokens are scored

    def rate(self, device: Device) -> float:
        """How many times faster than the profile `device` computes: its speed, and its class's
        half-precision speedup against the reference class's at the profile's precision.  A
        device measured itself (at the run's precision: set-up checks) has it in its speed."""
        if device.profile:
            return device.speed
        return (device.speed * precision_speedup(device.device_class, self.precision)
                / precision_speedup("reference", self.profile.precision))

    def step_seconds(self, device: Device, plan: Plan) -> float:
        p, n = self.profile, self.info.num_layers
        lowest = min(plan.trained(n), default=n)
        layers = 0.0  # at the profiled shape
        running = plan.running(n)
        for layer in plan.resident(n):
            rank = plan.ranks.get(layer, 0)
            forward = at_rank(p.forward_lora_s, rank, layer) if rank else p.forward_frozen_s[layer]
            backward = at_rank(p.backward_s, max(rank, 1), layer) if layer >= lowest else 0.0
            layers += running[layer] * (forward + backward) * self.block_share(plan.block(layer))
        outside = p.step_fit().outside(plan.batch_size, self.seq_len)
        return (outside + layers * p.layer_scale(plan.batch_size, self.seq_len)) / self.rate(device)

    def block_share(self, block: str) -> float:
        """The fraction of a layer's FLOPs in `block` (1 for both)."""
        if block == BOTH:
            return 1.0
        hidden = max(i for _, i in self.info.shapes.values())
        flops = {b: 2 * n for b, n in self.info.block_params.items()}
        flops["attn"] += 4 * self.seq_len * hidden
        return flops[block] / sum(flops.values())

    def probe_seconds(self, device: Device, plan: Plan) -> float:
        """The device-side probe the plan asks for (0 if none)."""
        if not plan.probe_rows:
            return 0.0
        p, n = self.profile, self.info.num_layers
        layers = sum(p.forward_frozen_s)
        passes = 1 + n * (2 if plan.probe_blocks else 1)  # each pass after the first skips one unit:
        seconds = passes * (p.embed_s + layers) - layers  # together, the whole model's layers once
        forward = seconds * p.layer_scale(plan.probe_rows, self.seq_len)
        # CKA between every pair of the units' outputs: a (d x tokens) by (tokens x d) product
        # per pair and per unit (testbed.measure.probe.cka_matrix), at the reference's FLOP rate.
        k, hidden = n * (2 if plan.probe_blocks else 1), max(i for _, i in self.info.shapes.values())
        cka_flops = (k * (k - 1) // 2 + k) * 2 * plan.probe_rows * self.seq_len * hidden ** 2
        return (forward + cka_flops / (REFERENCE_GFLOPS * 1e9)) / self.rate(device)

    def validation_seconds(self, device: Device, plan: Plan) -> float:
        """Validating the device's model on its validation rows, before and after training (0 if
        the plan does not ask)."""
        rows = device.val_rows
        if not plan.validate or not rows:
            return 0.0
        p, n = self.profile, self.info.num_layers
        forward = p.embed_s + p.head_s
        for layer in plan.resident(n):
            rank = plan.ranks.get(layer, 0)
            layer_s = at_rank(p.forward_lora_s, rank, layer) if rank else p.forward_frozen_s[layer]
            forward += layer_s * self.block_share(plan.block(layer))
        return 2 * self.eval_passes * forward * p.layer_scale(rows, self.seq_len) / self.rate(device)

    def busy_seconds(self, device: Device, plan: Plan) -> float:
        """The seconds the device computes in a round: training, the probe and validation."""
        return (plan.local_steps * self.step_seconds(device, plan) + self.probe_seconds(device, plan)
                + self.validation_seconds(device, plan))

    def lora_params(self, plan: Plan, layers: list[int]) -> int:
        per_rank = sum(o + i for o, i in self.info.shapes.values())
        return sum(plan.ranks.get(l, 0) * per_rank for l in layers)

    def shapes(self, plan: Plan, layers: list[int]) -> tuple[LoraState, HeadState]:
        """Stand-in tensors (no data) of the plan's LoRA slices of these layers, and of the head."""
        lora = {}
        for l in layers:
            r = plan.ranks[l]
            lora[l] = {}
            for m, (out_f, in_f) in self.info.shapes.items():
                lora[l][f"{m}.A"] = torch.empty(r, in_f, device="meta")
                lora[l][f"{m}.B"] = torch.empty(out_f, r, device="meta")
        return lora, {n: torch.empty(s, device="meta") for n, s in self.head_shapes.items()}

    def bytes_down(self, plan: Plan) -> int:
        lora, head = self.shapes(plan, plan.downlink(self.info.num_layers))
        return LENGTH_PREFIX + packed_size(plan_message(0, "device", 0, plan, lora, head), self.wire_dtype)

    def bytes_up(self, plan: Plan) -> int:
        """The update of a plan (its measured loss and step counts change the header by a few bytes)."""
        n = self.info.num_layers
        lora, head = self.shapes(plan, plan.shared(n))
        units = n * (2 if plan.probe_blocks else 1)
        probe = LayerProbe([[0.0] * units] * units, {"loss": [0.0] * units, "cosine": [0.0] * units},
                           plan.probe_blocks) if plan.probe_rows else None
        update = Update("device", 0, lora, head, samples=1000, active_steps=dict.fromkeys(plan.resident(n), 10),
                        steps=plan.local_steps, loss=1.2345678901234567, probe=probe)
        return LENGTH_PREFIX + packed_size(update_message(update, 0), self.wire_dtype)

    def peak_memory_bytes(self, device: Device, plan: Plan) -> int:
        """What the round holds at its peak: training, or the probe where the plan asks for one."""
        return max(self.training_memory_bytes(plan), self.probe_memory_bytes(plan))

    def training_memory_bytes(self, plan: Plan) -> int:
        n, act = self.info.num_layers, self.activations
        params = {BOTH: self.info.layer_params, **self.info.block_params}
        per_layer = {BOTH: act.per_layer, **act.per_block}
        resident = sum(params[plan.block(l)] for l in plan.resident(n)) + self.info.other_params
        lora = self.lora_params(plan, plan.trained(n))
        frozen = self.lora_params(plan, [l for l in plan.adapted(n) if l in plan.frozen])
        lowest = min(plan.trained(n), default=n)
        tokens = plan.batch_size * self.seq_len
        saving = sorted((per_layer[plan.block(l)] for l in plan.resident(n) if l >= lowest), reverse=True)
        saved = tokens * (act.fixed + sum(saving[: plan.max_active or None]))  # the worst step under the cap
        head = sum(torch.Size(s).numel() for s in self.head_shapes.values()) * FLOAT_BYTES
        return int(resident * self.base_dtype.itemsize + (4 * lora + frozen) * FLOAT_BYTES + 3 * head + saved)

    def probe_memory_bytes(self, plan: Plan) -> int:
        """The device-side probe (0 if the plan asks none): every layer resident with the LoRA the
        plan sends, the outputs of the embeddings, of every layer (and attention block, by block)
        and their float copies for the CKA, every token counted (the probe copies only those that
        are not padding), and three logits' worth of a causal LM's vocabulary (testbed.measure.probe)."""
        if not plan.probe_rows:
            return 0
        n, info = self.info.num_layers, self.info
        hidden = max(i for _, i in info.shapes.values())
        held = (1 + n * (2 if plan.probe_blocks else 1)) * hidden * (self.base_dtype.itemsize + FLOAT_BYTES)
        per_token = held + 3 * info.vocab_size * FLOAT_BYTES
        return int((n * info.layer_params + info.other_params) * self.base_dtype.itemsize
                   + self.lora_params(plan, plan.downlink(n)) * FLOAT_BYTES
                   + plan.probe_rows * self.seq_len * per_token)

    def fits(self, device: Device, plan: Plan) -> bool:
        return self.peak_memory_bytes(device, plan) <= device.memory_mb * MIB

    def within_memory(self, device: Device, plan: Plan) -> Plan | None:
        """`plan` if it fits; else `plan` with the largest cap on the layers a step runs that fits
        (layer dropout whose every step fits, not only the average one); None if one layer does not."""
        if self.fits(device, plan):
            return plan
        for k in range(len(plan.resident(self.info.num_layers)) - 1, 0, -1):
            capped = dataclasses.replace(plan, max_active=k)
            if self.fits(device, capped):
                return capped
        return None

    def transfer_seconds(self, device: Device, nbytes: int) -> float:
        return device.latency_ms / 1000 + nbytes * 8 / (device.bandwidth_mbit * 1e6)

    def round_seconds(self, device: Device, plan: Plan) -> float:
        return (self.busy_seconds(device, plan) + self.transfer_seconds(device, self.bytes_down(plan))
                + self.transfer_seconds(device, self.bytes_up(plan)))
