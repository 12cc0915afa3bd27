"""Adaptive: pruning, layer dropout and per-layer rank in one plan per device (beyond the papers).

Each round a common deadline is set as in LEGEND (the reference device's predicted baseline
round) times a factor that a bandit picks online among `factors`, or with `full_arm` FedLoRA's
round (the slowest device's baseline round, in which every device can train every layer at
full rank: a late round may trade speed for accuracy).  Its reward is the round's
progress per second of the round (as long as its slowest device, on the run's clock), read
from the devices' validation splits, never the test set: each device validates the global
model it receives before training, so the next round's reports show what this round's
aggregate gained (accuracy, or the drop in loss; samples-weighted over the devices).

With `relax`, once a round has gained at least `relax` of the headroom the first validation
left (1 - accuracy, or the loss) and a later round gains less than `relax` times the largest
gain so far, the gain per round has flattened (the first condition keeps a flat start, which
is noise, from counting): from then on the deadline is the slowest device's baseline round,
so every device that can runs FedLoRA's plan and late rounds trade speed for accuracy.

The deadline is raised to the slowest device's fastest plan (the round cannot be shorter, so
the others may use the time).  Every device then gets, from the cost model, the plan that fits
its memory and meets the deadline with the most LoRA capacity (rank x (1 - p) summed over
trained layers, then depth), then the least dropout, among:

- layers: all of them; where no plan over all layers fits the device's memory, FedPruner's
  submodel (the most layers that fit, one kept per group of alike layers, probed by the server
  on the run's public proxy set, `data.proxy_file`; without one the layers are drawn at random,
  for the server holds no other rows);
- depth and ranks: every depth and ramp of LEGEND's (its options apply but `choose`; `below` is
  `frozen` by default here, unlike LEGEND's `none`: the layers under the depth then run the
  global LoRA forward only, which is what dropout skips by default);
- dropout: each level of `drops`, on the layers below the depth (`drop_on: frozen`: they run
  forward only, so skipping them saves time without touching what the device trains) or on
  every layer it runs (`all`).

A device that meets the deadline with no plan gets the fastest plan that fits.  Layers are
aggregated as in LEGEND (`pad` by default), the head averaged."""
from __future__ import annotations

import dataclasses
import random

from testbed.core.errors import TestbedError
from testbed.core.options import FedPrunerOptions
from testbed.core.plan import LayerProbe, Plan, Report
from testbed.core.state import GlobalState
from testbed.server.bandit import Bandit
from testbed.server.strategies.base import Strategy
from testbed.server.strategies.fedpruner import (FedPruner, Pruner,
                                                 probe_from_dict,
                                                 probe_to_dict)
from testbed.server.strategies.legend import (baseline_seconds, candidates,
                                              round_deadline, top_rank)


class Adaptive(Strategy):
    name = "adaptive"

    @classmethod
    def max_rank(cls, cfg) -> int:
        return top_rank(cfg)  # as LEGEND: the top layer's rank

    @classmethod
    def check_options(cls, cfg) -> None:
        opts = cfg.strategy
        if not opts.factors or any(f <= 0 for f in opts.factors):
            raise TestbedError(f"strategy.factors: expected positive numbers, got {opts.factors}")
        if not opts.drops or any(not 0 <= p < 1 for p in opts.drops):
            raise TestbedError(f"strategy.drops: expected numbers in [0, 1), got {opts.drops}")

    def __init__(self, ctx):
        super().__init__(ctx)
        # FedPruner (its default options) picks the submodel of a device whose memory is too small.
        self.pruner = Pruner(ctx, FedPrunerOptions(name=FedPruner.name), fine=False)
        self.probe: LayerProbe | None = None  # the pruner's probe of the global model (on the proxy set)
        self.probed = -1  # the round whose global model it probed
        self.bandit = Bandit(len(self.opts.factors) + self.opts.full_arm, self.opts.bandit, self.opts.epsilon)
        self.rng = random.Random(ctx.cfg.seed)
        self.arm = 0  # this round's
        self.pending: tuple[int, float] | None = None  # the last round's arm and seconds, awaiting its reward
        self.last: float | None = None  # validation accuracy (or loss) the last round started from
        self.best_gain = 0.0  # the largest gain of a round so far
        self.headroom: float | None = None  # what the first validation left to gain
        self.relaxed = False
        self.plans: dict[str, Plan] = {}

    def plan(self, round: int, available: list[str], state: GlobalState) -> dict[str, Plan]:
        chosen = self.sample(round, available)
        # Starved devices' submodels are chosen on the model they will start from (at random without a proxy set).
        if self.ctx.probe and any(self.starved(d) for d in chosen):
            self.probe, self.probed = self.ctx.probe(state, self.pruner.opts.probe_rows, False), round
        spaces = {d: self.space(d) for d in chosen}
        if not self.relaxed:
            self.arm = self.bandit.select(self.rng, list(range(self.bandit.arms)))
        validate = not self.relaxed  # the deadline charges the validation the plans will run
        if self.relaxed or self.arm == len(self.opts.factors):  # FedLoRA's round
            deadline = max(baseline_seconds(self.ctx, chosen, validate).values())
        else:
            deadline = round_deadline(self.ctx, available, validate) * self.opts.factors[self.arm]
        # A round lasts at least as long as its slowest device's fastest plan: the others may use that.
        deadline = max([deadline, *(self.cost_of(d, self.configure(d, spaces[d], 0.0)) for d in chosen)])
        self.plans = {d: self.configure(d, spaces[d], deadline) for d in chosen}
        return self.plans

    def cost_of(self, device: str, plan: Plan) -> float:
        return self.ctx.cost.round_seconds(self.ctx.devices[device], plan)

    def configure(self, device: str, space: list[Plan], deadline: float) -> Plan:
        """The plan with the most capacity (then the least dropout) that meets the deadline; else the fastest."""
        timed = [(self.cost_of(device, p), p) for p in space]
        if meeting := [p for s, p in timed if s <= deadline]:
            return max(meeting, key=lambda p: (*self.capacity(p), -max(p.drop.values(), default=0.0)))
        return min(timed, key=lambda t: t[0])[1]

    def starved(self, device: str) -> bool:
        """No plan over all layers fits the device's memory."""
        return not any(self.ctx.cost.fits(self.ctx.devices[device], c) for c in candidates(self.ctx))

    def space(self, device: str) -> list[Plan]:
        """LEGEND's candidates that fit the device's memory, over all layers or, on a starved device,
        over FedPruner's submodel (chosen on this round's probe), at each dropout level."""
        dev, cost, n = self.ctx.devices[device], self.ctx.cost, self.ctx.model.num_layers
        whole = candidates(self.ctx)
        fitting = [c for c in whole if cost.fits(dev, c)]
        if not fitting:
            layers = self.pruner.submodel(device, self.probe).layers
            pruned = [dataclasses.replace(c, layers=layers) for c in whole]
            fitting = [c for c in pruned if c.trained(n) and cost.fits(dev, c)] or pruned[-1:]
        # Devices validate while the bandit and the relax test need it (each validation costs forward passes).
        return [dataclasses.replace(self.with_drop(c, p), validate=not self.relaxed)
                for p in self.opts.drops for c in fitting]

    def with_drop(self, plan: Plan, p: float) -> Plan:
        n = self.ctx.model.num_layers
        layers = [l for l in plan.resident(n) if self.opts.drop_on == "all" or l in plan.frozen]
        return dataclasses.replace(plan, drop=dict.fromkeys(layers, p)) if p and layers else plan

    def capacity(self, plan: Plan) -> tuple[float, int]:
        """Expected LoRA rank trained per step (summed over layers), then depth."""
        trained = plan.trained(self.ctx.model.num_layers)
        return sum(plan.ranks[l] * (1 - plan.drop.get(l, 0.0)) for l in trained), len(trained)

    def rule(self) -> str:
        return self.opts.aggregation  # LEGEND's

    def observe(self, round: int, reports: dict[str, Report], metrics: dict) -> None:
        """Reward the last round's arm with the progress its aggregate shows on this round's
        validation, per second of that round; the test metrics are not read.  Relaxed rounds have
        no arm to reward."""
        if self.relaxed:
            return
        mine = {d: r for d, r in reports.items() if d in self.plans}
        value = self.validation(mine) if mine else None
        if self.pending and value is not None and self.last is not None:
            arm, seconds = self.pending
            gain = value - self.last if self.opts.reward == "accuracy" else self.last - value
            self.bandit.update(arm, gain / max(seconds, 1e-9))
            self.best_gain = max(self.best_gain, gain)
            self.relaxed = self.flattened(gain)
        if value is not None:
            if self.headroom is None:
                self.headroom = 1 - value if self.opts.reward == "accuracy" else value
            self.last = value
        times = [self.ctx.cost.round_seconds(self.ctx.devices[d], self.plans[d]) if self.ctx.cfg.clock == "modelled"
                 else r.compute_s for d, r in mine.items()]
        self.pending = None if self.relaxed or not mine else (self.arm, max(times))

    def flattened(self, gain: float) -> bool:
        """After a steep round (one that gained `relax` of the headroom), a round that gains less
        than `relax` of the steepest."""
        r = self.opts.relax
        return r > 0 and self.best_gain >= r * self.headroom and gain < r * self.best_gain

    def validation(self, reports: dict[str, Report]) -> float:
        """The global model the devices received, on their validation splits (weighted by samples)."""
        key = "val_accuracy_before" if self.opts.reward == "accuracy" else "val_loss_before"
        weights = {d: self.ctx.samples[d] for d in reports}
        return sum(getattr(r, key) * weights[d] for d, r in reports.items()) / max(sum(weights.values()), 1)

    def state_dict(self) -> dict:
        return {"bandit": vars(self.bandit), "rng": self.rng.getstate(), "arm": self.arm, "pending": self.pending,
                "last": self.last, "best_gain": self.best_gain, "headroom": self.headroom, "relaxed": self.relaxed,
                "pruner": {"rng": self.pruner.rng.getstate(), "probe": probe_to_dict(self.probe)},
                "probed": self.probed}

    def load_state_dict(self, state: dict) -> None:
        self.bandit = Bandit(**state["bandit"])
        self.rng.setstate(state["rng"])
        self.arm, self.last, self.best_gain = state["arm"], state["last"], state["best_gain"]
        self.headroom, self.relaxed, self.probed = state["headroom"], state["relaxed"], state["probed"]
        self.pending = tuple(state["pending"]) if state["pending"] else None
        self.pruner.rng.setstate(state["pruner"]["rng"])
        self.probe = probe_from_dict(state["pruner"]["probe"])
