"""The device profiler: what one training step costs on this device, layer by layer.

`profile_device` times a real training step with hooks on every transformer layer: forward
with LoRA at a few ranks and without (frozen), backward per layer (the span between
consecutive backward hooks), embeddings and head; it counts the bytes each layer saves for
backward, resident bytes per layer, LoRA and optimizer bytes per rank.  It runs where the
backbone is placed, in its precision: on a GPU every timestamp waits for the queued work
(a synchronisation), so a layer's time is its kernels', not their launch.  Then it times whole
training steps (the optimizer's too) at a few other batch sizes and lengths, and fits to them
the terms of a step's seconds at any shape (StepFit): the per-layer seconds hold at the
profiled shape only.  A DeviceProfile is what the CostModel predicts from.  Link bandwidth and latency are recorded where a transport
measured them (0 = not measured; the device class's figures are used then).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from testbed.core.config import CAUSAL_LM, LoraConfig
from testbed.core.errors import TestbedError
from testbed.measure.memory import SavedTensorCounter, nbytes
from testbed.model.backbone import Backbone
from testbed.model.info import ModelInfo
from testbed.model.lora import lora_applied
from testbed.model.placement import describe


@dataclass
class StepFit:
    """A training step's seconds at any batch b and length L, fitted to steps timed at `shapes`
    ([batch, length] pairs): a layer (forward and backward, LoRA on every layer, the mean over
    the layers) takes layer_s + token_s x b x L + attention_s x b x L^2, and the rest of the step
    (embeddings, head, optimizer, Python) outside_s + outside_token_s x b x L."""
    shapes: list[list[int]]
    layer_s: float  # per layer and step: kernel launches, hooks, dispatch
    token_s: float  # per layer and token: the dense matmuls
    attention_s: float  # per layer and token, per unit of length: attention scores and their softmax
    outside_s: float  # per step: the optimizer, Python, the loss
    outside_token_s: float  # per token outside the layers: embeddings, head

    def layer(self, batch: int, length: int) -> float:
        tokens = batch * length
        return self.layer_s + self.token_s * tokens + self.attention_s * tokens * length

    def outside(self, batch: int, length: int) -> float:
        return self.outside_s + self.outside_token_s * batch * length


@dataclass
class DeviceProfile:
    model: str
    fingerprint: str  # layer count and LoRA module shapes: a profile only fits its own model
    num_layers: int
    batch_size: int
    seq_len: int
    threads: int
    forward_frozen_s: list[float]  # per layer, one step of batch_size x seq_len, no LoRA
    forward_lora_s: dict[int, list[float]]  # rank -> per layer
    backward_s: dict[int, list[float]]  # rank -> per layer, LoRA on every layer
    embed_s: float
    head_s: float  # head forward and backward
    saved_bytes_per_token: list[float]  # per layer, with LoRA
    resident_bytes: list[int]  # per layer
    other_bytes: int  # embeddings, norms, head
    lora_bytes_per_rank: int  # one layer's LoRA factors per unit of rank
    optimizer_bytes_per_rank: int  # AdamW keeps two moments per LoRA parameter
    bandwidth_mbit: float = 0.0
    latency_ms: float = 0.0
    source: str = field(default="measured")  # "measured" or "analytic"
    device: str = "cpu"  # where it was measured: "cpu", or the GPU and its compute capability
    precision: str = "fp32"  # the autocast precision it was measured in (train.precision)
    fit: StepFit | None = None  # None (profiles from before the fit, analytic ones): linear in tokens

    def layers_s(self) -> list[float]:
        """Each layer's forward and backward at the profiled shape, LoRA at the lowest profiled rank."""
        rank = min(self.backward_s)
        return [f + b for f, b in zip(self.forward_lora_s.get(rank, self.forward_frozen_s), self.backward_s[rank])]

    def step_fit(self) -> StepFit:
        """The fitted terms; for a profile without them, seconds proportional to tokens (the
        embeddings and head as the rest of the step), which is all such a profile can say."""
        if self.fit is not None:
            return self.fit
        tokens = self.batch_size * self.seq_len
        layers = self.layers_s()
        return StepFit([[self.batch_size, self.seq_len]], 0.0, sum(layers) / len(layers) / tokens, 0.0,
                       0.0, (self.embed_s + self.head_s) / tokens)

    def layer_scale(self, batch: int, length: int) -> float:
        """A layer's seconds at (batch, length) over its seconds at the profiled shape: what the
        per-layer times measured there are multiplied by."""
        fit = self.step_fit()
        return fit.layer(batch, length) / fit.layer(self.batch_size, self.seq_len)

    def step_seconds(self, batch: int, length: int) -> float:
        """A training step with LoRA on every layer (the lowest profiled rank) at (batch, length)."""
        return self.step_fit().outside(batch, length) + sum(self.layers_s()) * self.layer_scale(batch, length)

    def speed(self, reference: DeviceProfile) -> float:
        """This device's training speed relative to the reference's (higher is faster), both at
        the reference's shape."""
        shape = reference.batch_size, reference.seq_len
        return reference.step_seconds(*shape) / self.step_seconds(*shape)

    def step_footprint_bytes(self, batch: int | None = None) -> float:
        """The counted footprint of the profiled step (the largest rank on every layer) at `batch`
        (default: the profiled one): parameters, LoRA and its gradients, saved activations."""
        rank = max(self.backward_s)
        tokens = (batch or self.batch_size) * self.seq_len
        return (self.other_bytes + sum(self.resident_bytes) + 2 * rank * self.lora_bytes_per_rank * self.num_layers
                + sum(self.saved_bytes_per_token) * tokens)

    def save(self, path: Path) -> None:
        data = dataclasses.asdict(self)
        text = json.dumps(data, indent=1) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        path.write_text(text)


def fingerprint(info: ModelInfo) -> str:
    shapes = sorted((m, list(s)) for m, s in info.shapes.items())
    return hashlib.sha256(json.dumps([info.num_layers, shapes, info.layer_params]).encode()).hexdigest()[:16]


def load_profile(path: Path, info: ModelInfo | None = None) -> DeviceProfile:
    try:
        text = Path(path).read_text()
        data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except FileNotFoundError:
        raise TestbedError(f"{path}: profile not found") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise TestbedError(f"{path}: not a readable device profile: {str(exc).splitlines()[0]}") from None
    return profile_from_dict(data, str(path), info)


def profile_from_dict(data: object, source: str, info: ModelInfo | None = None) -> DeviceProfile:
    """A profile from its saved form; `source` (a file, a rank) names the culprit in errors."""
    if not isinstance(data, dict):
        raise TestbedError(f"{source}: not a device profile (expected a mapping)")
    names = {f.name for f in dataclasses.fields(DeviceProfile)}
    required = {f.name for f in dataclasses.fields(DeviceProfile)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if missing := sorted(required - set(data)):
        raise TestbedError(f"{source}: not a device profile: missing {', '.join(missing)}")
    if unknown := sorted(set(data) - names):
        raise TestbedError(f"{source}: not a device profile: unknown key {unknown[0]}")
    try:
        data = {**data, "forward_lora_s": {int(r): [float(x) for x in v] for r, v in data["forward_lora_s"].items()},
                "backward_s": {int(r): [float(x) for x in v] for r, v in data["backward_s"].items()},
                "fit": _fit_from_dict(data["fit"], data["batch_size"], data["seq_len"]) if data.get("fit") else None}
        profile = DeviceProfile(**data)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise TestbedError(f"{source}: malformed device profile: {exc}") from None
    if info is not None and profile.fingerprint != fingerprint(info):
        raise TestbedError(f"{source}: a profile of {profile.model} ({profile.num_layers} layers), "
                           f"not of this run's model ({info.num_layers} layers)")
    return profile


def _fit_from_dict(raw: dict, batch_size: int, seq_len: int) -> StepFit:
    """A saved fit, checked: its terms numbers, none negative, and a layer that takes time at the
    profiled shape (the cost model divides by it)."""
    terms = {k: float(v) for k, v in raw.items() if k != "shapes"}
    fit = StepFit([[int(b), int(l)] for b, l in raw["shapes"]], **terms)
    if min(terms.values()) < 0 or fit.layer(batch_size, seq_len) <= 0:
        raise ValueError("fit: a negative term, or a layer that takes no time at the profiled shape")
    return fit


def profile_device(bb: Backbone, name: str, info: ModelInfo, lora_cfg: LoraConfig, batch_size: int = 16,
                   seq_len: int = 64, ranks: tuple[int, ...] = (2, 8, 16), repeats: int = 3,
                   fit: bool = True) -> DeviceProfile:
    """Time and count a training step of this backbone on this device; with `fit`, also whole
    steps at a few other shapes (`fit_shapes`), which the step's terms are fitted to."""
    n = bb.num_layers
    batch = _stand_in_batch(bb, batch_size, seq_len)
    frozen = _median(_timed_steps(bb, {}, lora_cfg, batch, repeats, backward=False))
    fwd, bwd, saved, timed = {}, {}, [], {}
    for r in ranks:
        timed[r] = runs = _timed_steps(bb, dict.fromkeys(range(n), r), lora_cfg, batch, repeats, backward=True)
        m = _median(runs)
        fwd[r], bwd[r] = m["forward"], m["backward"]
        saved = [b / (batch_size * seq_len) for b in runs[-1]["saved"]]
        embed, head = m["embed"], m["head"]
    rank = min(ranks)  # the rank DeviceProfile.layers_s reads
    step_fit = (_fitted(bb, lora_cfg, rank, fit_shapes(batch_size, seq_len, _max_len(bb)), timed[rank], repeats)
                if fit else None)
    layer_bytes = [nbytes(layer.parameters()) for layer in bb.layers]
    total = nbytes(bb.model.parameters())
    per_rank = sum(o + i for o, i in info.shapes.values()) * 4
    return DeviceProfile(model=name, fingerprint=fingerprint(info), num_layers=n, batch_size=batch_size,
                         seq_len=seq_len, threads=torch.get_num_threads(), forward_frozen_s=frozen["forward"],
                         forward_lora_s=fwd, backward_s=bwd, embed_s=embed, head_s=head,
                         saved_bytes_per_token=saved, resident_bytes=layer_bytes, other_bytes=total - sum(layer_bytes),
                         lora_bytes_per_rank=per_rank, optimizer_bytes_per_rank=2 * per_rank,
                         device=describe(bb.placement.device), precision=bb.placement.precision, fit=step_fit)


def _fitted(bb: Backbone, lora_cfg: LoraConfig, rank: int, shapes: list[list[int]], first: list[dict],
            repeats: int) -> StepFit:
    """`fit_step` on training steps at `shapes`, LoRA at `rank` on every layer (those of the first
    shape already timed: `first`); medians over the runs of each shape."""
    n = bb.num_layers
    timed = [first] + [_timed_steps(bb, dict.fromkeys(range(n), rank), lora_cfg, _stand_in_batch(bb, b, l),
                                    repeats, backward=True) for b, l in shapes[1:]]
    layers = [[sum(r["forward"]) + sum(r["backward"]) for r in runs] for runs in timed]
    return fit_step(shapes, [statistics.median(ls) / n for ls in layers],
                    [statistics.median(r["step"] - l for r, l in zip(runs, ls)) for runs, ls in zip(timed, layers)])


def _stand_in_batch(bb: Backbone, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = bb.model.config.vocab_size
    ids = torch.randint(1000 % vocab, vocab, (batch_size, seq_len), generator=g)
    return bb.placement.inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                "labels": bb.stand_in_labels(ids)})


def fit_shapes(batch_size: int, seq_len: int, max_len: int) -> list[list[int]]:
    """The profiled shape first, then shapes no bigger in tokens or in attention (batch x
    length^2), so none needs more memory than it: twice the rows at half the length (the same
    tokens, half the attention), half the rows at half the length (a quarter of the tokens), and
    a quarter of the rows at twice the length (half the tokens, the same attention) where the
    model takes `max_len` tokens.  Together they tell apart the fixed, per-token and attention
    terms, one shape more than the three need."""
    shapes = [[batch_size, seq_len], [2 * batch_size, seq_len // 2], [batch_size // 2, seq_len // 2]]
    if 2 * seq_len <= max_len:
        shapes.append([batch_size // 4, 2 * seq_len])
    return [s for i, s in enumerate(shapes) if min(s) >= 1 and s not in shapes[:i]]


def _max_len(bb: Backbone) -> int:
    """The longest sequence the model's position embeddings take: RoBERTa's start past the
    padding index, so 2 short of their count for every model (a shape of the fit, not a limit)."""
    positions = getattr(bb.model.config, "max_position_embeddings", None)
    return positions - 2 if positions else 2**31


def fit_step(shapes: list[list[int]], layer_s: list[float], outside_s: list[float]) -> StepFit:
    """The terms of a step from the seconds timed at `shapes`: a layer's (the mean over the
    layers) and those of the rest of the step."""
    layer = _nonnegative_fit([[1.0, b * l, b * l * l] for b, l in shapes], layer_s)
    outside = _nonnegative_fit([[1.0, b * l] for b, l in shapes], outside_s)
    return StepFit(shapes, *layer, *outside)


def _nonnegative_fit(features: list[list[float]], seconds: list[float]) -> list[float]:
    """Coefficients of the features that fit the seconds best in relative error, none negative (a
    negative term would make some bigger step cheaper): the best least-squares fit over every
    subset of the terms (a handful), the others left at zero."""
    x = torch.tensor(features, dtype=torch.float64) / torch.tensor(seconds, dtype=torch.float64)[:, None]
    ones = torch.ones(len(seconds), 1, dtype=torch.float64)
    terms = range(x.shape[1])
    best, best_error = [0.0] * x.shape[1], float("inf")
    for k in range(1, x.shape[1] + 1):
        for keep in itertools.combinations(terms, k):
            coef = torch.linalg.lstsq(x[:, keep], ones).solution
            error = float(((x[:, keep] @ coef - ones) ** 2).sum())
            if (coef >= 0).all() and error < best_error:
                best_error = error
                best = [float(coef[keep.index(i)]) if i in keep else 0.0 for i in terms]
    return best


def _timed_steps(bb: Backbone, ranks: dict[int, int], lora_cfg: LoraConfig, batch: dict, repeats: int,
                 backward: bool) -> list[dict]:
    """One warm-up and `repeats` timed steps, with a timestamp at every layer boundary."""
    n, stamps = bb.num_layers, {}
    now = bb.placement.clock  # waits for the GPU, where there is one
    hooks = []
    for i, layer in enumerate(bb.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: stamps.__setitem__(("f0", i), now())))
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: stamps.__setitem__(("f1", i), now())))
        if backward:
            hooks.append(layer.register_full_backward_pre_hook(
                lambda m, g, i=i: stamps.__setitem__(("b0", i), now())))
    runs = []
    try:
        with lora_applied(bb, ranks, lora_cfg) as model:
            model.train()
            counter = SavedTensorCounter(model)
            if backward:  # the trainer's step: the head trains too, and AdamW steps all that trains
                for p in bb.head_params().values():
                    p.requires_grad_(True)
                # lr 0: the optimizer's work without changing the head, which outlives the profile
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
            for step in range(repeats + 1):
                saved = []  # counter readings at each layer's start and end: bytes saved inside it
                for layer in bb.layers:
                    hooks.append(layer.register_forward_pre_hook(lambda m, a: saved.append(counter.bytes)))
                    hooks.append(layer.register_forward_hook(lambda m, a, o: saved.append(counter.bytes)))
                stamps.clear()
                start = now()
                with counter, torch.set_grad_enabled(backward), bb.placement.autocast():
                    loss = model(**batch).loss
                done = now()
                if backward:
                    with warnings.catch_warnings():  # layer 0's input needs no gradient: expected
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                end = now()
                if backward:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                stepped = now()
                for h in hooks[-2 * n:]:
                    h.remove()
                del hooks[-2 * n:]
                if step == 0:
                    continue  # warm-up
                run = {"forward": [stamps["f1", i] - stamps["f0", i] for i in range(n)],
                       "embed": stamps["f0", 0] - start, "step": stepped - start,
                       "saved": [saved[2 * i + 1] - saved[2 * i] for i in range(n)]}
                if backward:
                    ends = [stamps["b0", i - 1] if i else end for i in range(n)]
                    run["backward"] = [ends[i] - stamps["b0", i] for i in range(n)]
                    run["head"] = (done - stamps["f1", n - 1]) + (stamps["b0", n - 1] - done)
                runs.append(run)
    finally:
        for h in hooks:
            h.remove()
    return runs


def _median(runs: list[dict]) -> dict:
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, list):
            out[key] = [statistics.median(r[key][i] for r in runs) for i in range(len(value))]
        else:
            out[key] = statistics.median(r[key] for r in runs)
    return out


def analytic_profile(info: ModelInfo, name: str, seq_len: int, gflops: float) -> DeviceProfile:
    """A profile from FLOP counts, for models nobody has profiled: forward about 2 x parameters
    plus attention per token, backward about as much again, at `gflops` of throughput.  The
    parameters outside the layers count as the head's: once per row for a classifier, on every
    token for a causal LM (its head spans the vocabulary, as its embeddings do)."""
    hidden = max(i for _, i in info.shapes.values())
    tokens = 16 * seq_len
    layer = tokens * (2 * info.layer_params + 4 * seq_len * hidden) / (gflops * 1e9)
    per_rank = sum(o + i for o, i in info.shapes.values()) * 4
    n = info.num_layers
    head_flops = 2 * tokens * info.other_params
    if info.task != CAUSAL_LM:
        head_flops /= seq_len
    return DeviceProfile(model=name, fingerprint=fingerprint(info), num_layers=n, batch_size=16, seq_len=seq_len,
                         threads=0, forward_frozen_s=[layer] * n, forward_lora_s={8: [layer] * n},
                         backward_s={8: [layer] * n}, embed_s=0.0, head_s=head_flops / (gflops * 1e9),
                         saved_bytes_per_token=[0.0] * n,
                         resident_bytes=[info.layer_params * 4] * n, other_bytes=info.other_params * 4,
                         lora_bytes_per_rank=per_rank, optimizer_bytes_per_rank=2 * per_rank, source="analytic")
