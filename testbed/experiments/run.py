"""One experiment in this process with the in-process transport."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from testbed.agent.agent import Agent
from testbed.comm.transport import InProcess
from testbed.core.config import ExperimentConfig
from testbed.data import write_labels
from testbed.experiments.setup import check_inputs, setup
from testbed.server.loop import RoundLoop
from testbed.server.rundir import RunDir


def run_inprocess(cfg: ExperimentConfig, out: Path, quiet: bool = False, resume: bool = False,
                  force: bool = False) -> dict:
    """Run `cfg` in `out`, which this process holds until the run ends (see RunDir.take for
    `resume` and `force`). Everything that needs no model is checked before `out` is touched."""
    inputs = check_inputs(cfg)
    with RunDir.take(out, cfg, resume, force):
        if not quiet:
            print(f"testbed: run directory {out}", file=sys.stderr)
        exp = setup(cfg, inputs=inputs)
        agents = {d: Agent(d, cfg, exp.bb, exp.data.train, exp.data.shards[d], exp.devices[d].memory_mb)
                  for d in exp.devices}
        loop = RoundLoop(exp, InProcess(agents, getattr(torch, cfg.wire.dtype)), out, quiet, resume)
        write_labels(exp.data.label_names, out)
        return loop.run()
