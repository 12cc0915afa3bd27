"""FedPruner: functionality-driven layer grouping and memory-budget submodels.

Reconstructed from arXiv 2508.17209; every guess is an option.  Every `regroup_every` rounds
the server probes the global model on a small proxy batch (an option stands in for devices
computing it themselves: the proxy spares small devices a full-model pass).  For each device,
K = the number of layers its memory budget affords (cost model); the layers are partitioned
into K groups by the linear CKA of their outputs (contiguous segments cut where adjacent
layers are least alike, or agglomerative graph clustering), and one layer per group is kept,
the most important (loss increase when skipped, or 1 - cosine of input and output), or one
sampled in proportion to importance.  `selection: random` keeps K random layers (a baseline).
The device holds and trains only its kept layers; each original layer is averaged over the
devices that held it.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from testbed.aggregate import aggregate, average_head
from testbed.config import StrategyConfig, option
from testbed.plan import Plan, Update
from testbed.probe import LayerProbe
from testbed.strategies.base import Strategy
from testbed.strategies.fedlora import contributions


@dataclass
class FedPrunerOptions(StrategyConfig):
    grouping: str = option("contiguous", choices=("contiguous", "graph"))
    importance: str = option("loss", choices=("loss", "cosine"))
    selection: str = option("importance", choices=("importance", "sampled", "random"))
    regroup_every: int = option(1, lo=1, doc="rounds between probes of the global model")
    probe_rows: int = option(32, lo=2, doc="rows of the proxy batch the server probes with")


def contiguous_groups(cka: list[list[float]], k: int) -> list[list[int]]:
    """K contiguous segments, cut at the K-1 boundaries where adjacent layers are least alike."""
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


class FedPruner(Strategy):
    name = "fedpruner"
    Options = FedPrunerOptions

    def __init__(self, ctx, state):
        super().__init__(ctx, state)
        self.rng = random.Random(ctx.cfg.seed)
        self.probe: LayerProbe | None = None

    def affordable_layers(self, device: str) -> int:
        """The most layers whose submodel the cost model says fits the device (at least one)."""
        n, rank = self.ctx.model.num_layers, self.ctx.cfg.model.lora.rank
        for k in range(n, 0, -1):
            layers = list(range(n - k, n))
            if self.ctx.cost.fits(self.ctx.devices[device], self.base_plan(dict.fromkeys(layers, rank), layers=layers)):
                return k
        return 1

    def choose(self, k: int) -> list[int]:
        n = self.ctx.model.num_layers
        if k >= n:
            return list(range(n))
        if self.opts.selection == "random":
            return sorted(self.rng.sample(range(n), k))
        split = contiguous_groups if self.opts.grouping == "contiguous" else graph_groups
        score = self.probe.importance[self.opts.importance]
        kept = []
        for group in split(self.probe.cka, k):
            if self.opts.selection == "sampled" and sum(score[l] for l in group) > 0:
                kept.append(self.rng.choices(group, weights=[score[l] for l in group])[0])
            else:
                kept.append(max(group, key=lambda l: (score[l], -l)))
        return sorted(kept)

    def plan(self, round: int, available: list[str]) -> dict[str, Plan]:
        if self.opts.selection != "random" and (self.probe is None or round % self.opts.regroup_every == 0):
            self.probe = self.ctx.probe(self.state, self.opts.probe_rows)
        rank = self.ctx.cfg.model.lora.rank
        plans = {}
        for device in self.sample(round, available):
            layers = self.choose(self.affordable_layers(device))
            plans[device] = self.base_plan(dict.fromkeys(layers, rank), layers=layers)
        return plans

    def aggregate(self, round: int, updates: list[Update]) -> None:
        self.state.lora = aggregate(self.state.lora, contributions(updates), "fedavg")
        self.state.head = average_head([(u.samples, u.head) for u in updates])

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "probe": None if self.probe is None else dataclasses.asdict(self.probe)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.probe = None if state["probe"] is None else LayerProbe(**state["probe"])
