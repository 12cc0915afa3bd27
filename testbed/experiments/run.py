"""One experiment in this process with the in-process transport."""
from __future__ import annotations

from pathlib import Path

import torch

from testbed.agent.agent import Agent
from testbed.comm.transport import InProcess
from testbed.core.config import ExperimentConfig
from testbed.data import write_labels
from testbed.experiments.setup import setup
from testbed.server.loop import RoundLoop


def run_inprocess(cfg: ExperimentConfig, out: Path, quiet: bool = False, resume: bool = False) -> dict:
    exp = setup(cfg)
    agents = {d: Agent(d, cfg, exp.bb, exp.data.train, exp.data.shards[d], exp.devices[d].memory_mb)
              for d in exp.devices}
    loop = RoundLoop(exp, InProcess(agents, getattr(torch, cfg.wire.dtype)), out, quiet, resume)
    write_labels(exp.data.label_names, out)
    return loop.run()
