"""Strategy options as data: the `option` field helper, the options every strategy has, and each
strategy's own, by strategy name.  The strategies' code lives in `testbed.server.strategies`;
config parsing needs only these dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def option(default: Any, *, lo: float | None = None, hi: float | None = None, gt: float | None = None,
         choices: tuple | None = None, doc: str = "") -> Any:
    meta = {"lo": lo, "hi": hi, "gt": gt, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class StrategyConfig:
    """Options every strategy has; a strategy subclasses this with its own."""

    name: str = option("fedlora", doc="the strategy that plans and aggregates the rounds (docs/strategies.md)")
    clients_per_round: int = option(0, lo=0, doc="devices sampled per round; 0 = all")
    validate: bool = option(False, doc="each device evaluates its model on its own validation split before and "
                                       "after training (personal_accuracy); droppeft always does (its reward)")


@dataclass
class HetRankOptions(StrategyConfig):
    max_rank: int = option(0, lo=0, doc="rank of the fastest device; 0 = model.lora.rank")
    min_rank: int = option(2, lo=1, doc="the lowest rank a device gets")
    ranks: dict[str, int] = option({}, doc="fixed rank per device class, overriding the speed rule")


def below_option(default: str) -> Any:
    """`below`, which legend and adaptive default differently."""
    return option(default, choices=("none", "frozen"),
                  doc="layers under a device's depth: none: run without LoRA (not sent down; the device's model "
                      "then differs from the global one); frozen: run the global LoRA frozen (sent down, run "
                      "forward, not trained)")


@dataclass
class DepthRankOptions(StrategyConfig):
    """LEGEND's plans (LoRA depth and rank ramp) and deadline: what legend and adaptive share."""

    max_rank: int = option(0, lo=0, doc="rank of the top layer; 0 = model.lora.rank")
    min_rank: int = option(2, lo=1, doc="rank of the lowest LoRA layer at full ramp")
    min_depth: int = option(1, lo=1, doc="the fewest top layers a device may train LoRA on")
    rank_profile: str = option("ramp", choices=("ramp", "uniform"),
                               doc="ramp: ranks rise toward the output, min_rank on the lowest LoRA layer to "
                                   "max_rank on the top one (lower or flatter ramps where a device needs them); "
                                   "uniform: one rank on every LoRA layer of a plan")
    deadline_device: str = option("median", doc="median, fastest, slowest, or a device class name")
    deadline_factor: float = option(1.0, gt=0, doc="scales the reference device's predicted round time")
    aggregation: str = option("pad", choices=("pad", "hetlora", "flexlora"),
                              doc="the rule (testbed/server/aggregate.py) layers are averaged by; "
                                  "pad: rank rows averaged over the devices that hold them")


@dataclass
class LegendOptions(DepthRankOptions):
    choose: str = option("paper", choices=("paper", "ranks"),
                         doc="paper: the full ramp on the deepest top layers that meet the deadline, its ranks "
                             "halved only where min_depth at the full ramp does not (the paper's structure); "
                             "ranks: the plan with the largest sum of ranks, then the deepest (the baseline "
                             "wherever it meets the deadline)")
    below: str = below_option("none")


@dataclass
class AdaptiveOptions(DepthRankOptions):
    below: str = below_option("frozen")  # the layers dropout skips by default (drop_on: frozen)
    drops: list[float] = option([0.0, 0.1, 0.2], doc="layer dropout levels a device may use to meet the deadline")
    drop_on: str = option("frozen", choices=("frozen", "all"),
                          doc="layers dropout may skip: those below the device's depth (forward only), or all it runs")
    factors: list[float] = option([1.0, 0.9], doc="the bandit's arms: factors on LEGEND's deadline")
    full_arm: bool = option(True, doc="one more arm: FedLoRA's round, the slowest device's baseline round")
    bandit: str = option("ucb1", choices=("ucb1", "epsilon", "thompson"), doc="how the bandit picks an arm")
    epsilon: float = option(0.1, lo=0, hi=1, doc="exploration rate of bandit: epsilon")
    reward: str = option("accuracy", choices=("accuracy", "loss"),
                         doc="progress of the global model on the devices' validation splits")
    relax: float = option(0.25, lo=0, hi=1, doc="once a round's validation gain falls below this fraction of the "
                                               "largest so far (itself at least this fraction of the headroom), "
                                               "every deadline is the slowest device's baseline round (0: never)")


@dataclass
class DropPEFTOptions(StrategyConfig):
    shapes: list[str] = option(["uniform"], doc="the arms' shapes: uniform: p everywhere; rising: p_l = p_max (l+1)/L; "
                                                "falling: p_l = p_max (L-l)/L")
    maxima: list[float] = option([0.0, 0.2, 0.4, 0.6], doc="the p (or p_max) of each arm; arms = shapes x maxima, "
                                                           "each tried once before a bandit exploits")
    bandit: str = option("ucb1", choices=("ucb1", "epsilon", "thompson"), doc="how a bandit picks an arm")
    epsilon: float = option(0.1, lo=0, hi=1, doc="exploration rate of bandit: epsilon")
    bandit_per: str = option("class", choices=("class", "device"),
                             doc="a bandit per device class, whose devices run one arm a round, or one per device")
    reward: str = option("accuracy", choices=("accuracy", "loss"),
                         doc="the devices' validation accuracy gain, or loss drop, in their local training, "
                             "per second (see reward_time)")
    reward_baseline: str = option("round_mean", choices=("round_mean", "none"),
                                  doc="round_mean: a group's gain per second less the round's mean over the groups, "
                                      "divided by the round's mean magnitude (early rounds gain more whatever the "
                                      "arm); none: the gain per second itself")
    straggler: str = option("pace", choices=("pace", "clamp", "none"),
                            doc="pace: the group whose fastest arm is slowest picks the round's arm, the others run "
                                "the least dropout that finishes within its round; clamp: every group picks and "
                                "each runs the least dropout within the slowest pick's round; none: each runs its pick")
    reward_time: str = option("device", choices=("device", "round"),
                              doc="the seconds a gain is divided by: its group's own (at the reference device's "
                                  "speed), or the round's (its slowest device's), the same for every group")
    personal_k: int = option(0, lo=0, doc="layers whose LoRA stays on the devices (PTLS); 0 = none: the global "
                                        "model, which accuracy is measured on, then holds every layer's LoRA")
    personal_by: str = option("top", choices=("top", "drift"),
                               doc="the personal layers: the top personal_k, or those whose client updates drift "
                                   "most over the first drift_rounds")
    drift_rounds: int = option(1, lo=1, doc="rounds with every layer shared before drift picks the personal ones")


@dataclass
class FedPrunerOptions(StrategyConfig):
    grouping: str = option("contiguous", choices=("contiguous", "graph"),
                           doc="units grouped by the linear CKA of their outputs: contiguous segments cut where "
                               "neighbours are least alike, or agglomerative clustering of the CKA graph")
    importance: str = option("loss", choices=("loss", "cosine"),
                             doc="a unit's importance: the loss increase when it is skipped, or 1 - cosine of its "
                                 "input and output")
    selection: str = option("importance", choices=("importance", "sampled", "random"),
                            doc="the unit kept of each group: the most important, or one sampled in proportion to "
                                "importance; random: K random units (a baseline)")
    regroup_every: int = option(1, lo=1, doc="rounds between probes")
    probe_rows: int = option(32, lo=2, doc="rows a probe runs on: a seeded sample of each device's own training "
                                           "rows, or of the server's proxy set")
    cka: str = option("device", choices=("device", "server"),
                      doc="who probes: the devices whose memory holds the probe (every layer), each on its own "
                          "rows, sent with their updates and averaged by samples (used from the next round; "
                          "until the first arrive, the kept units are drawn at random); or the server, on the "
                          "public proxy set data.proxy_file (required)")

# The options of each strategy, by the name configs use (`strategy.name`).
STRATEGY_OPTIONS: dict[str, type[StrategyConfig]] = {
    "fedlora": StrategyConfig,
    "hetlora": HetRankOptions,
    "flexlora": HetRankOptions,
    "legend": LegendOptions,
    "droppeft": DropPEFTOptions,
    "fedpruner": FedPrunerOptions,
    "fedpruner_fine": FedPrunerOptions,
    "adaptive": AdaptiveOptions,
}
