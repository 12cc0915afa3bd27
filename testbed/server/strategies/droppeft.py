"""DropPEFT: stochastic transformer layer dropout, bandit-chosen ratios, personal layers.

Reconstructed from arXiv 2503.10217; every guess is an option.  An arm is a dropout vector: at
every local step a device skips each layer with its arm's probability, so a skipped layer costs
no compute and stores nothing.  An arm whose predicted memory does not fit a device runs there
with a cap on the layers a step may run (the most that fit: `Plan.max_active`), so that every
step fits, not only the average one; a group (below) with a device on which no arm fits even
at one layer runs the lightest arm, and that device's out-of-memory is recorded.

Arms: each of `shapes` at each of `maxima`, by default four uniform ratios from 0 to 0.6.  A
bandit gets one reward a round, so the arms must be few for a run's horizon: four are tried in
the first four rounds and a 20-round run exploits from then on (seven arms, two shapes, were
all still being tried at round 6).

Groups: the devices of a class share a bandit (`bandit_per: class`; `device`: a bandit each),
and a group runs one arm in a round on all its devices (an arm that fits all of them).  Rounds
are synchronous: a class's devices are about equally fast, so different arms on them buy no
time, and one reward from all of them averages their noise.

Pace (`straggler: pace`, the default): a round lasts as long as its slowest device, so only the
dropout of the group that sets the round's length saves time.  That group, the one whose
fastest arm is slowest (the round cannot end before it), picks its arm with its bandit; the
arm's predicted round is the round's bound, and every other group runs the least dropout that
meets it (dropout on devices that finish early anyway only costs learning).  `clamp`: every
group's bandit picks, the bound is the slowest pick, and each group runs the least dropout that
meets it (so any group's low-dropout pick undoes the pacer's); `none`: each group runs its pick.
Either way every bandit is credited with the arm its group ran, so that a class's bandit has
learnt something by the rounds it paces (when the sample leaves the slower classes out).

Reward: an arm changes its devices' validation gain (accuracy after local training minus
before, or the drop in loss: `reward`) and their round's seconds (`reward_time: device`: on the
modelled clock the predicted round of the plans they ran, on the wall clock their measured
compute).  x = the group's mean gain per second of its slowest device, the seconds counted at the
reference device's speed (times the device's speed) so that fast and slow devices' arms are on
one scale.  The reward is x minus the round's mean x over the groups, over the round's mean |x|
(`reward_baseline: round_mean`): the gain per round shrinks as the model converges, so without a
comparison within the round the arms tried first would look best, and the division keeps late
rounds' rewards on the scale of early ones.  The pacer is rewarded when its arm gains more per
second than the other groups, which run the least dropout they can.  A round with one group has
nothing to compare (its reward is 0): in a run of one class, `bandit_per: device` with
`straggler: none` lets devices try arms side by side.  `reward_time: round` charges every group
the round's seconds (the former reward: with the baseline, no arm is credited for time saved).

PTLS keeps `personal_k` layers' LoRA on the devices: the top layers, or those with the largest
client drift after the first rounds.  Off by default: the global model, which the run's
accuracy and time to target are measured on, would hold those layers' LoRA at their initial
value, which in the methods' study cost the global model more accuracy than dropout saved
time (each device's own model is reported as `personal_accuracy`).
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import torch

from testbed.comm.transport import Failure
from testbed.core.errors import TestbedError
from testbed.core.plan import Plan, Report, Update
from testbed.core.state import GlobalState
from testbed.server.aggregate import Contribution, contributions
from testbed.server.bandit import Bandit
from testbed.server.strategies.base import Strategy, base_plan


@dataclass
class Group:
    """The round's devices that share a bandit and run one arm together."""

    key: str  # the bandit's: a device class, or a device
    plans: dict[str, list[Plan]]  # per device, its plan for each arm (capped to fit its memory)
    seconds: list[float]  # per arm, the predicted round of the group's slowest device
    allowed: list[int]  # the arms that fit every device (the lightest, if none does)
    arm: int = -1  # the arm it runs this round

    def fastest(self) -> float:
        return min(self.seconds[i] for i in self.allowed)


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
        self.groups: list[Group] = []  # this round's
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

    def dropout(self, arm: int) -> float:
        return sum(self.arms[arm].values())

    def bandit_key(self, device: str) -> str:
        return self.ctx.devices[device].device_class if self.opts.bandit_per == "class" else device

    def bandit(self, key: str) -> Bandit:
        return self.bandits.setdefault(key, Bandit(len(self.arms), self.opts.bandit, self.opts.epsilon))

    def plan(self, round: int, available: list[str], state: GlobalState) -> dict[str, Plan]:
        if self.opts.personal_by == "drift" and round == self.opts.drift_rounds and not self.personal:
            ranked = sorted(range(len(self.drift)), key=lambda l: -self.drift[l])
            self.personal = sorted(ranked[: self.opts.personal_k])
        devices = self.sample(round, available)
        self.groups = self.group(devices)
        if not self.groups:
            return {}
        # Under `pace` only the group that sets the round's length chooses: no other's dropout saves time.
        choosing = [max(self.groups, key=Group.fastest)] if self.opts.straggler == "pace" else self.groups
        picks = {g.key: self.bandit(g.key).select(self.rng, g.allowed) for g in choosing}
        bound = max(g.seconds[picks[g.key]] for g in choosing)
        for g in self.groups:
            # Never empty: the bound is at least every group's fastest arm (pace) or its pick (clamp).
            meeting = [i for i in g.allowed if g.seconds[i] <= bound]
            g.arm = picks[g.key] if self.opts.straggler == "none" else min(meeting, key=self.dropout)
        ran = {d: plans[g.arm] for g in self.groups for d, plans in g.plans.items()}
        return {d: ran[d] for d in devices}  # in the sample's order, as the devices' rows are

    def group(self, devices: list[str]) -> list[Group]:
        """The devices by bandit, with each one's plan and the group's predicted round per arm."""
        ranks = dict.fromkeys(range(self.ctx.model.num_layers), self.ctx.cfg.model.lora.rank)
        arms = [base_plan(self.ctx.cfg, ranks, drop=arm, personal=self.personal, validate=True) for arm in self.arms]
        members: dict[str, list[str]] = {}
        for device in devices:
            members.setdefault(self.bandit_key(device), []).append(device)
        return [self.fit(key, names, arms) for key, names in members.items()]

    def fit(self, key: str, devices: list[str], arms: list[Plan]) -> Group:
        cost = self.ctx.cost
        plans, seconds, fitting = {}, [0.0] * len(arms), set(range(len(arms)))
        for d in devices:
            device = self.ctx.devices[d]
            fitted = [cost.within_memory(device, p) for p in arms]
            fitting &= {i for i, f in enumerate(fitted) if f}
            plans[d] = [f or p for f, p in zip(fitted, arms)]
            seconds = [max(s, cost.round_seconds(device, p)) for s, p in zip(seconds, plans[d])]
        lightest = max(range(len(arms)), key=self.dropout)
        return Group(key, plans, seconds, sorted(fitting) or [lightest])

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
        """Credit each group's bandit with the arm the group ran (see the module's Reward)."""
        ran = [g for g in self.groups if any(d in reports for d in g.plans)]
        seconds = {g.key: {d: self.clock_seconds(g, d, reports[d]) for d in g.plans if d in reports} for g in ran}
        if self.opts.reward_time == "round":
            charged = dict.fromkeys(seconds, max(s for own in seconds.values() for s in own.values()))
        else:  # at the reference device's speed, so that fast and slow devices compare
            charged = {k: max(s * self.ctx.devices[d].speed for d, s in own.items()) for k, own in seconds.items()}
        per_second = {k: statistics.fmean(self.gain(reports[d]) for d in own) / max(charged[k], 1e-9)
                      for k, own in seconds.items()}
        for g in ran:
            self.bandit(g.key).update(g.arm, self.reward(per_second, g.key))

    def clock_seconds(self, group: Group, device: str, report: Report) -> float:
        """The device's round on the run's clock: predicted for its plan (modelled), or its measured compute (wall)."""
        if self.ctx.cfg.clock == "modelled":
            return self.ctx.cost.round_seconds(self.ctx.devices[device], group.plans[device][group.arm])
        return report.compute_s

    def gain(self, report: Report) -> float:
        if self.opts.reward == "accuracy":
            return report.val_accuracy - report.val_accuracy_before
        return report.val_loss_before - report.val_loss

    def reward(self, per_second: dict[str, float], key: str) -> float:
        """The group's gain per second against the round's mean over the groups, in units of the
        round's mean magnitude (so that the shrinking gains of late rounds weigh as much)."""
        if self.opts.reward_baseline == "none":
            return per_second[key]
        values = per_second.values()
        scale = sum(abs(v) for v in values) / len(values)
        return (per_second[key] - sum(values) / len(values)) / scale if scale else 0.0

    def state_dict(self) -> dict:
        return {"bandits": {k: vars(b) for k, b in self.bandits.items()}, "personal": self.personal,
                "drift": self.drift, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.bandits = {k: Bandit(**v) for k, v in state["bandits"].items()}
        self.personal, self.drift = state["personal"], state["drift"]
        self.rng.setstate(state["rng"])
