"""CostModel: predicted seconds, memory and bytes of a Plan on a Device.

Strategies reason about devices only through this.  Compute is counted in
FLOPs per token (forward 2 x parameters, backward through a frozen layer about as
much again) and divided by the device's throughput: the reference throughput times
the device's speed factor.
"""
from __future__ import annotations

from dataclasses import dataclass

from testbed.devices import Device
from testbed.model import ModelInfo
from testbed.plan import Plan

FLOAT_BYTES = 4
REFERENCE_GFLOPS = 80.0  # effective training throughput of the reference machine


@dataclass
class CostModel:
    info: ModelInfo
    seq_len: int
    reference_gflops: float = REFERENCE_GFLOPS

    def step_seconds(self, device: Device, plan: Plan) -> float:
        """Expected seconds of one local step (dropout makes a layer's cost its keep probability)."""
        tokens = plan.batch_size * self.seq_len
        active = sum(1 - plan.drop.get(l, 0.0) for l in plan.resident(self.info.num_layers))
        flops = tokens * 2 * (2 * self.info.layer_params * active + self.info.other_params / 10)
        return flops / (self.reference_gflops * 1e9 * device.speed)

    def lora_bytes(self, ranks: dict[int, int], layers: list[int]) -> int:
        per_rank = sum(o + i for o, i in self.info.shapes.values())
        return sum(ranks.get(l, 0) * per_rank * FLOAT_BYTES for l in layers)

    def bytes_down(self, plan: Plan) -> int:
        return self.lora_bytes(plan.ranks, plan.shared(self.info.num_layers))

    def bytes_up(self, plan: Plan) -> int:
        return self.lora_bytes(plan.ranks, plan.shared(self.info.num_layers))

    def transfer_seconds(self, device: Device, nbytes: int) -> float:
        return device.latency_ms / 1000 + nbytes * 8 / (device.bandwidth_mbit * 1e6)

    def peak_memory_bytes(self, device: Device, plan: Plan) -> int:
        """Resident weights, LoRA with gradients and Adam state, and a coarse activation estimate."""
        resident = len(plan.resident(self.info.num_layers)) * self.info.layer_params + self.info.other_params
        lora = self.lora_bytes(plan.ranks, plan.trained(self.info.num_layers))
        hidden = max(o for o, _ in self.info.shapes.values())
        activations = plan.batch_size * self.seq_len * hidden * 16 * FLOAT_BYTES * len(plan.trained(self.info.num_layers))
        return resident * FLOAT_BYTES + 4 * lora + activations

    def fits(self, device: Device, plan: Plan) -> bool:
        return self.peak_memory_bytes(device, plan) <= device.memory_mb * 1024 * 1024

    def round_seconds(self, device: Device, plan: Plan) -> float:
        return (plan.local_steps * self.step_seconds(device, plan)
                + self.transfer_seconds(device, self.bytes_down(plan))
                + self.transfer_seconds(device, self.bytes_up(plan)))
