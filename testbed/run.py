"""One experiment in this process with the in-process transport."""
from __future__ import annotations

from pathlib import Path

import torch

from agents.agent import Agent
from testbed.aggregator import Aggregator
from testbed.config import ExperimentConfig
from testbed.experiment import setup
from testbed.transport import InProcess


def run_inprocess(cfg: ExperimentConfig, out: Path, quiet: bool = False, resume: bool = False) -> dict:
    exp = setup(cfg)
    agents = {d: Agent(d, cfg, exp.bb, exp.data.train, exp.data.shards[d], exp.devices[d].memory_mb)
              for d in exp.devices}
    return Aggregator(exp, InProcess(agents, getattr(torch, cfg.wire.dtype)), out, quiet, resume).run()
