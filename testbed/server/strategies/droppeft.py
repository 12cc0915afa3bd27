"""DropPEFT: stochastic transformer layer dropout, bandit-chosen ratios, personal layers.

Reconstructed from arXiv 2503.10217; every guess is an option.  Each round a bandit per
device (or per device class) picks a dropout vector (an arm); at every local step the
device skips each layer with that probability, so a skipped layer costs no compute and
stores nothing.  The reward is the gain in the device's validation accuracy (or the drop
in its validation loss) per second of the round on the run's clock.  An arm whose predicted
memory does not fit the device runs with a cap on the layers a step may run (the most that fit:
`Plan.max_active`), so that every step fits, not only the average one.  A device on which no
arm fits even at one layer runs the lightest arm, and its out-of-memory is recorded.

Rounds are synchronous: a round lasts as long as its slowest device, so dropout on a device
that would finish early anyway saves no time and only costs learning.  By default
(`straggler: clamp`) the round's bound is the slowest predicted round among the arms the
bandits chose, and every device runs the least dropout that meets it; the reward then charges
the round's seconds (`reward_time: round`), which is what the run pays for any device's arm.

PTLS keeps `personal_k` layers' LoRA on the devices: the top layers, or those with the largest
client drift after the first rounds.  Off by default: the global model, which the run's
accuracy and time to target are measured on, would hold those layers' LoRA at their initial
value, which in the methods' study cost the global model more accuracy than dropout saved
time (each device's own model is reported as `personal_accuracy`).
"""
from __future__ import annotations

import random

import torch

from testbed.comm.transport import Failure
from testbed.core.errors import TestbedError
from testbed.core.plan import Plan, Report, Update
from testbed.core.state import GlobalState
from testbed.server.aggregate import Contribution, contributions
from testbed.server.bandit import Bandit
from testbed.server.strategies.base import Strategy, base_plan


class DropPEFT(Strategy):
    name = "droppeft"

    @classmethod
    def check_options(cls, cfg) -> None:
        for shape in cfg.strategy.shapes:
            cls.arm(shape, 0.0, 1)  # refuses a shape it does not know

    def __init__(self, ctx):
        super().__init__(ctx)
        n = ctx.model.num_layers
        self.arms = []
        for shape in self.opts.shapes:
            for p in self.opts.maxima:
                arm = self.arm(shape, p, n)
                if arm not in self.arms:  # e.g. uniform 0 and rising 0 are the same arm
                    self.arms.append(arm)
        self.bandits: dict[str, Bandit] = {}
        self.chosen: dict[str, int] = {}
        self.plans: dict[str, Plan] = {}
        self.drift = [0.0] * n
        self.personal = list(range(n - self.opts.personal_k, n)) if self.opts.personal_by == "top" else []
        self.rng = random.Random(ctx.cfg.seed)

    @staticmethod
    def arm(shape: str, p: float, n: int) -> dict[int, float]:
        if shape == "uniform":
            return {l: p for l in range(n)}
        if shape == "rising":
            return {l: p * (l + 1) / n for l in range(n)}
        if shape == "falling":
            return {l: p * (n - l) / n for l in range(n)}
        raise TestbedError(f"strategy.shapes: unknown arm shape {shape!r} (uniform, rising, falling)")

    def bandit_key(self, device: str) -> str:
        return self.ctx.devices[device].device_class if self.opts.bandit_per == "class" else device

    def plan(self, round: int, available: list[str], state: GlobalState) -> dict[str, Plan]:
        if self.opts.personal_by == "drift" and round == self.opts.drift_rounds and not self.personal:
            ranked = sorted(range(len(self.drift)), key=lambda l: -self.drift[l])
            self.personal = sorted(ranked[: self.opts.personal_k])
        rank = self.ctx.cfg.model.lora.rank
        ranks = {l: rank for l in range(self.ctx.model.num_layers)}
        arms = [base_plan(self.ctx.cfg, ranks, drop=arm, personal=self.personal, validate=True) for arm in self.arms]
        lightest = max(range(len(self.arms)), key=lambda i: sum(self.arms[i].values()))
        candidates, allowed = {}, {}
        for device in self.sample(round, available):
            bandit = self.bandits.setdefault(self.bandit_key(device),
                                             Bandit(len(self.arms), self.opts.bandit, self.opts.epsilon))
            fitted = [self.ctx.cost.within_memory(self.ctx.devices[device], p) for p in arms]
            candidates[device] = [f or p for f, p in zip(fitted, arms)]
            allowed[device] = [i for i, f in enumerate(fitted) if f]
            self.chosen[device] = bandit.select(self.rng, allowed[device] or [lightest])
        if self.opts.straggler == "clamp" and allowed:
            self.clamp(candidates, allowed)
        self.plans = {d: candidates[d][self.chosen[d]] for d in allowed}
        return self.plans

    def clamp(self, candidates: dict[str, list[Plan]], allowed: dict[str, list[int]]) -> None:
        """Each device runs the least dropout whose predicted round ends within the slowest chosen one."""
        devices, cost = self.ctx.devices, self.ctx.cost
        seconds = {d: [cost.round_seconds(devices[d], p) for p in candidates[d]] for d in allowed}
        bound = max(seconds[d][self.chosen[d]] for d in allowed)
        for d in allowed:
            within = [i for i in allowed[d] if seconds[d][i] <= bound] + [self.chosen[d]]
            self.chosen[d] = min(within, key=lambda i: sum(self.arms[i].values()))

    def aggregate(self, round: int, updates: list[Update], failures: list[Failure],
                  state: GlobalState) -> GlobalState:
        if self.opts.personal_by == "drift" and round < self.opts.drift_rounds:
            self.measure_drift(contributions(updates))
        return super().aggregate(round, updates, failures, state)

    def measure_drift(self, per_layer: dict[int, list[Contribution]]) -> None:
        """Client drift of a layer: mean distance of the devices' updates B A from their average."""
        for layer, contribs in per_layer.items():
            modules = {n[:-2] for n in contribs[0].factors}
            for m in modules:
                products = [c.factors[f"{m}.B"] @ c.factors[f"{m}.A"] for c in contribs]
                mean = torch.stack(products).mean(0)
                self.drift[layer] += float(sum(torch.linalg.norm(p - mean) for p in products) / len(products))

    def observe(self, round: int, reports: dict[str, Report], metrics: dict) -> None:
        reports = {d: r for d, r in reports.items() if d in self.plans}
        seconds = {d: (self.ctx.cost.round_seconds(self.ctx.devices[d], self.plans[d])
                       if self.ctx.cfg.clock == "modelled" else r.compute_s) for d, r in reports.items()}
        if self.opts.reward_time == "round" and seconds:
            seconds = dict.fromkeys(seconds, max(seconds.values()))
        rewards = {}
        for device, report in reports.items():
            gain = (report.val_accuracy - report.val_accuracy_before if self.opts.reward == "accuracy"
                    else report.val_loss_before - report.val_loss)
            rewards[device] = gain / max(seconds[device], 1e-9)
        baseline = sum(rewards.values()) / len(rewards) if rewards and self.opts.reward_baseline == "round_mean" else 0
        for device, reward in rewards.items():
            self.bandits[self.bandit_key(device)].update(self.chosen[device], reward - baseline)

    def state_dict(self) -> dict:
        return {"bandits": {k: vars(b) for k, b in self.bandits.items()}, "personal": self.personal,
                "drift": self.drift, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.bandits = {k: Bandit(**v) for k, v in state["bandits"].items()}
        self.personal, self.drift = state["personal"], state["drift"]
        self.rng.setstate(state["rng"])
