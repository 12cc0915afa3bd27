"""The data that crosses the aggregator/agent boundary: Plan, Update, Report.

LoRA state is always keyed by the *original* transformer layer index, whatever
subset of layers a device runs.  Inside a layer, tensors are named
``"<module path inside the layer>.A"`` / ``".B"``, for example
``"attention.self.query.A"`` (shape ``(rank, in)``) and
``"attention.self.query.B"`` (shape ``(out, rank)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

LayerState = dict[str, torch.Tensor]  # "<module>.A" / "<module>.B" -> tensor
LoraState = dict[int, LayerState]  # original layer index -> that layer's LoRA factors
HeadState = dict[str, torch.Tensor]  # classifier head parameters by name
BOTH = "both"  # a layer runs its attention and its FFN block (else "attn" or "ffn" alone)


@dataclass
class Plan:
    """What one device does in one round (docs/architecture.md, "Vocabulary")."""

    ranks: dict[int, int]  # LoRA rank per original layer index; 0 = no LoRA there
    layers: list[int] | None = None  # layers resident on the device; None = all
    drop: dict[int, float] = field(default_factory=dict)  # per-layer skip probability
    max_active: int = 0  # at most this many layers run in a step (0 = no cap): dropout within a memory budget
    personal: list[int] = field(default_factory=list)  # layers whose LoRA never leaves the device
    frozen: list[int] = field(default_factory=list)  # layers whose global LoRA runs but is not trained
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    validate: bool = False  # evaluate on the device's validation split before and after training
    blocks: dict[int, str] = field(default_factory=dict)  # per layer "attn" or "ffn": only it runs (else both)
    probe_rows: int = 0  # probe the model on this many rows of the device's data before training (0 = no)
    probe_blocks: bool = False  # the probe's units are blocks (attention, FFN), not layers

    def block(self, layer: int) -> str:
        return self.blocks.get(layer, BOTH)

    def resident(self, num_layers: int) -> list[int]:
        return list(range(num_layers)) if self.layers is None else sorted(self.layers)

    def adapted(self, num_layers: int) -> list[int]:
        """Layers that carry LoRA on the device, trained or frozen."""
        return [l for l in self.resident(num_layers) if self.ranks.get(l, 0) > 0]

    def trained(self, num_layers: int) -> list[int]:
        """Layers whose LoRA the device trains."""
        return [l for l in self.adapted(num_layers) if l not in self.frozen]

    def shared(self, num_layers: int) -> list[int]:
        """Layers whose trained LoRA travels both ways (down in the plan, up in the update)."""
        return [l for l in self.trained(num_layers) if l not in self.personal]

    def downlink(self, num_layers: int) -> list[int]:
        """Layers whose global LoRA the plan carries: the shared ones and the frozen ones."""
        return [l for l in self.adapted(num_layers) if l not in self.personal]

    def running(self, num_layers: int) -> dict[int, float]:
        """The probability that each resident layer runs in a step: it is drawn (1 - drop) and,
        under `max_active`, it is among the drawn layers kept (a uniform random subset)."""
        layers = self.resident(num_layers)
        drawn = {l: 1 - self.drop.get(l, 0.0) for l in layers}
        k = self.max_active
        if not k or k >= len(layers):
            return drawn
        running = {}
        for l in layers:
            others = count_distribution([drawn[o] for o in layers if o != l])
            running[l] = drawn[l] * sum(p * min(1.0, k / (j + 1)) for j, p in enumerate(others))
        return running


def count_distribution(probs: list[float]) -> list[float]:
    """P(exactly j of independent events with these probabilities happen), j = 0..len (Poisson binomial)."""
    dist = [1.0]
    for q in probs:
        dist = [a * (1 - q) + b * q for a, b in zip(dist + [0.0], [0.0] + dist)]
    return dist


@dataclass
class LayerProbe:
    """Linear CKA between unit outputs and unit importance, on one batch (testbed.probe).

    Units are the layers, or with `blocks` each layer's attention then its FFN block
    (unit 2l is layer l's attention, 2l + 1 its FFN)."""

    cka: list[list[float]]  # (U, U)
    importance: dict[str, list[float]]  # "loss" and "cosine": one value per unit
    blocks: bool = False


@dataclass
class Report:
    """What a device measured during its round."""

    compute_s: float = 0.0  # seconds of local work (wall): the probe and validation, if asked, and training
    step_s: float = 0.0  # median seconds per training step (wall)
    peak_train_mem_mb: float = 0.0  # counted footprint: training's, or the probe's where larger (testbed.measure)
    peak_rss_mb: float = 0.0  # process peak resident set size
    peak_cuda_mb: float = 0.0  # torch.cuda.max_memory_allocated in the round, where the model is on CUDA
    bytes_up: int = 0
    bytes_down: int = 0
    # On the device's own validation split (when the plan asks), before and after local training:
    val_accuracy_before: float = 0.0
    val_accuracy: float = 0.0
    val_loss_before: float = 0.0
    val_loss: float = 0.0
    # Only where the host has them (None elsewhere):
    measured_energy_j: float | None = None  # joules the host's power sensors counted over the round
    peak_cuda_reserved_mb: float | None = None  # torch.cuda.max_memory_reserved in the round (on CUDA)


@dataclass
class Update:
    """What a device returns after a round: sparse per-layer LoRA plus the head."""

    device: str
    round: int
    lora: LoraState  # only layers trained and shared
    head: HeadState
    samples: int
    active_steps: dict[int, int]  # per layer: steps in which it was active
    steps: int
    loss: float
    report: Report = field(default_factory=Report)
    probe: LayerProbe | None = None  # when the plan asked the device to probe


@dataclass
class Job:
    """What a device is handed for a round: its plan, the LoRA the plan needs, and the head."""

    plan: Plan
    lora: LoraState
    head: HeadState
