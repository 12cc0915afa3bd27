"""The Strategy contract: server-side policy, blind to transports, processes and files.

Once a round the round loop, which owns the global state, asks the strategy for the devices'
plans (`plan`), hands it what came back (`aggregate`: the admitted updates and the failures)
and takes the new global state it returns, then reports the round's results (`observe`).
A strategy keeps its own memory (bandits, probes, RNGs: `state_dict`), never the global state.
"""
from __future__ import annotations

import abc
import random
from dataclasses import dataclass
from typing import Callable

from testbed.comm.transport import Failure
from testbed.core.config import ExperimentConfig
from testbed.core.devices import Device
from testbed.core.plan import LayerProbe, Plan, Report, Update
from testbed.core.state import GlobalState
from testbed.model.info import ModelInfo
from testbed.server.aggregate import aggregate, average_head, contributions
from testbed.server.costmodel import CostModel


@dataclass
class Context:
    """Everything a strategy may consult."""

    cfg: ExperimentConfig
    model: ModelInfo
    devices: dict[str, Device]
    samples: dict[str, int]  # training rows per device
    cost: CostModel
    # The server's probe of a global model (rows, blocks) on the run's public proxy set; None where the
    # run has none (data.proxy_file), for the server holds no other rows.
    probe: Callable[[GlobalState, int, bool], LayerProbe] | None


class Strategy(abc.ABC):
    """plan -> (devices train) -> aggregate -> observe, once per round."""

    name = ""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.opts = ctx.cfg.strategy

    @classmethod
    def check_options(cls, cfg: ExperimentConfig) -> None:
        """Refuse options (cfg.strategy) that the config's ranges cannot, alone or with the rest of
        the config (TestbedError); run before the model loads."""

    @classmethod
    def max_rank(cls, cfg: ExperimentConfig) -> int:
        """The rank the global state is kept at (the largest any device may train)."""
        return cfg.model.lora.rank

    @abc.abstractmethod
    def plan(self, round: int, available: list[str], state: GlobalState) -> dict[str, Plan]:
        """The plans of the devices that take part in the round, among `available`; `state` is
        the global model they will start from, to be read (probed), not changed."""

    def rule(self) -> str:
        """How the devices' LoRA factors are aggregated, layer by layer (a method of
        testbed.server.aggregate): FedAvg, unless the devices train different ranks."""
        return "fedavg"

    def aggregate(self, round: int, updates: list[Update], failures: list[Failure],
                  state: GlobalState) -> GlobalState:
        """The global state after the round: the LoRA by the strategy's rule, the head averaged
        over the updates (by samples).  `failures` are the round's devices that sent nothing
        usable.  Nothing given is changed; with no update the state stays as it was."""
        if not updates:
            return state
        lora = aggregate(state.lora, contributions(updates), self.rule())
        return GlobalState(lora, average_head([(u.samples, u.head) for u in updates]))

    def observe(self, round: int, reports: dict[str, Report], metrics: dict) -> None:
        """Feedback after a round; stateless strategies ignore it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def sample(self, round: int, available: list[str]) -> list[str]:
        """The round's devices: `clients_per_round` of them, drawn by the round's seed, or all."""
        k = self.opts.clients_per_round
        if not k or k >= len(available):
            return list(available)
        return sorted(random.Random(self.ctx.cfg.seed * 7919 + round).sample(available, k))


def base_plan(cfg: ExperimentConfig, ranks: dict[int, int], **fields) -> Plan:
    """A plan with these LoRA ranks and the run's training settings (and the strategy's `validate`)."""
    t = cfg.train
    fields.setdefault("validate", cfg.strategy.validate)
    return Plan(ranks=ranks, local_steps=t.local_steps, batch_size=t.batch_size, lr=t.lr, **fields)
