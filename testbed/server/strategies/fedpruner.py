"""FedPruner: functionality-driven grouping and memory-budget submodels, by layer or by block.

Reconstructed from arXiv 2508.17209; every guess is an option.  Units are the transformer
layers (`fedpruner`) or each layer's attention block and FFN block (`fedpruner_fine`: a kept
layer may run only one of them).  Every `regroup_every` rounds the units are probed: by the
devices on rows of their own data, sent with their updates and averaged by samples (`cka:
device`, the default: used from the next round; until the first probes arrive, round 0 among
them, the kept units are drawn at random; a device whose memory cannot hold the probe, which
holds every layer, does not probe), or by the server on the public proxy set the run
names (`cka: server`, which needs `data.proxy_file`: spares small devices a full-model pass;
the server holds no other rows).  For each device, K = the most units whose selected submodel
the cost model says fits its memory budget; the units are partitioned into K groups by the
linear CKA of their outputs (contiguous segments cut where adjacent units are least alike, or
agglomerative graph clustering), and one unit per group is kept, the most important (loss
increase when skipped, or 1 - cosine of input and output), or one sampled in proportion to
importance.  `selection: random` keeps K random units (a baseline).  A layer carries LoRA when
the blocks it runs hold all of its LoRA modules (so with query/value targets, an FFN-only
layer runs frozen and its LoRA never travels).  The device holds and trains only its kept
units; each original layer is averaged over the devices that trained it.
"""
from __future__ import annotations

import dataclasses
import random

from testbed.comm.transport import Failure
from testbed.core.errors import TestbedError
from testbed.core.options import FedPrunerOptions
from testbed.core.plan import BOTH, LayerProbe, Plan, Update
from testbed.core.state import GlobalState
from testbed.measure.probe import units
from testbed.server.strategies.base import Context, Strategy, base_plan

Unit = tuple[int, str]  # (layer, "both" | "attn" | "ffn")


def contiguous_groups(cka: list[list[float]], k: int) -> list[list[int]]:
    """K contiguous segments, cut at the K-1 boundaries where adjacent units are least alike."""
    n = len(cka)
    cuts = sorted(sorted(range(n - 1), key=lambda l: (cka[l][l + 1], l))[: k - 1])
    groups, start = [], 0
    for c in cuts:
        groups.append(list(range(start, c + 1)))
        start = c + 1
    groups.append(list(range(start, n)))
    return groups


def graph_groups(cka: list[list[float]], k: int) -> list[list[int]]:
    """Agglomerative clustering of the CKA similarity graph (average linkage) into K groups."""
    groups = [[l] for l in range(len(cka))]
    while len(groups) > k:
        pairs = [(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))]
        i, j = max(pairs, key=lambda p: sum(cka[a][b] for a in groups[p[0]] for b in groups[p[1]])
                   / (len(groups[p[0]]) * len(groups[p[1]])))
        groups[i] = sorted(groups[i] + groups.pop(j))
    return sorted(groups)


def mean_probe(probes: list[tuple[float, LayerProbe]]) -> LayerProbe:
    """The weighted mean of the devices' probes, entry by entry."""
    total = sum(w for w, _ in probes)
    first = probes[0][1]
    n = len(first.cka)
    cka = [[sum(w * p.cka[i][j] for w, p in probes) / total for j in range(n)] for i in range(n)]
    importance = {k: [sum(w * p.importance[k][i] for w, p in probes) / total for i in range(n)]
                  for k in first.importance}
    return LayerProbe(cka, importance, first.blocks)


class Pruner:
    """FedPruner's choice of a device's submodel: the most units that fit its memory, one kept per
    group of alike units (grouped and scored by a probe of the model, or drawn at random)."""

    def __init__(self, ctx: Context, opts: FedPrunerOptions, fine: bool):
        self.ctx = ctx
        self.opts = opts
        self.units = units(ctx.model.num_layers, fine)
        self.rng = random.Random(ctx.cfg.seed)

    def submodel(self, device: str, probe: LayerProbe | None) -> Plan:
        """The plan keeping the most units whose selected submodel fits the device (at least one)."""
        dev = self.ctx.devices[device]
        for k in range(len(self.units), 1, -1):
            rng_state = self.rng.getstate()
            plan = self.plan_of(self.choose(k, probe))
            if self.ctx.cost.fits(dev, plan):
                return plan
            self.rng.setstate(rng_state)  # a submodel that does not fit draws nothing
        return self.plan_of(self.choose(1, probe))

    def choose(self, k: int, probe: LayerProbe | None) -> list[Unit]:
        n = len(self.units)
        if k >= n:
            return list(self.units)
        if self.opts.selection == "random" or probe is None:  # None: no device has probed yet
            return [self.units[u] for u in sorted(self.rng.sample(range(n), k))]
        split = contiguous_groups if self.opts.grouping == "contiguous" else graph_groups
        score = probe.importance[self.opts.importance]
        kept = []
        for group in split(probe.cka, k):
            if self.opts.selection == "sampled" and sum(score[u] for u in group) > 0:
                kept.append(self.rng.choices(group, weights=[score[u] for u in group])[0])
            else:
                kept.append(max(group, key=lambda u: (score[u], -u)))
        return [self.units[u] for u in sorted(kept)]

    def plan_of(self, kept: list[Unit]) -> Plan:
        """Kept units as a plan: a layer with one kept block runs only it; LoRA where its modules run."""
        runs: dict[int, set[str]] = {}
        for layer, block in kept:
            runs.setdefault(layer, set()).add(block)
        blocks = {l: b.pop() for l, b in runs.items() if len(b) == 1 and BOTH not in b}
        modules = self.ctx.model.module_blocks
        rank = self.ctx.cfg.model.lora.rank
        ranks = {l: rank for l in runs if l not in blocks or all(b == blocks[l] for b in modules.values())}
        return base_plan(self.ctx.cfg, ranks, validate=self.opts.validate, layers=sorted(runs), blocks=blocks)


def probe_to_dict(probe: LayerProbe | None) -> dict | None:
    return None if probe is None else dataclasses.asdict(probe)


def probe_from_dict(state: dict | None) -> LayerProbe | None:
    return None if state is None else LayerProbe(**state)


class FedPruner(Strategy):
    name = "fedpruner"
    fine = False  # units are layers; fedpruner_fine: attention and FFN blocks

    @classmethod
    def check_options(cls, cfg) -> None:
        if cfg.strategy.cka == "server" and not cfg.data.proxy_file:
            raise TestbedError("strategy.cka: server probes on public rows the server holds, and data.proxy_file "
                               "names none; name a proxy set there, or use strategy.cka: device")

    def __init__(self, ctx):
        super().__init__(ctx)
        if self.fine and not ctx.model.block_params:
            raise TestbedError(f"strategy.name: {self.name} needs a model whose attention and FFN blocks are "
                               "known (BERT, RoBERTa, LLaMA, Qwen2, Mistral)")
        self.pruner = Pruner(ctx, self.opts, self.fine)
        self.probe: LayerProbe | None = None

    def plan(self, round: int, available: list[str], state: GlobalState) -> dict[str, Plan]:
        probing = self.opts.selection != "random" and (round % self.opts.regroup_every == 0)
        if self.opts.cka == "server" and (probing or (self.probe is None and self.opts.selection != "random")):
            self.probe = self.ctx.probe(state, self.opts.probe_rows, self.fine)
        plans = {}
        for device in self.sample(round, available):
            plans[device] = self.pruner.submodel(device, self.probe)
            if probing and self.opts.cka == "device":
                probed = dataclasses.replace(plans[device], probe_rows=self.opts.probe_rows, probe_blocks=self.fine)
                # A device probes only if it can hold the whole model for it (pruned ones often cannot).
                if self.ctx.cost.fits(self.ctx.devices[device], probed):
                    plans[device] = probed
        return plans

    def aggregate(self, round: int, updates: list[Update], failures: list[Failure],
                  state: GlobalState) -> GlobalState:
        if probes := [(u.samples, u.probe) for u in updates if u.probe is not None]:
            self.probe = mean_probe(probes)
        return super().aggregate(round, updates, failures, state)

    def state_dict(self) -> dict:
        return {"rng": self.pruner.rng.getstate(), "probe": probe_to_dict(self.probe)}

    def load_state_dict(self, state: dict) -> None:
        self.pruner.rng.setstate(state["rng"])
        self.probe = probe_from_dict(state["probe"])


class FedPrunerFine(FedPruner):
    name = "fedpruner_fine"
    fine = True
