"""checkpoint.pt: everything the next round depends on, written after every round, so that a
resumed run continues exactly as if it had not stopped."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from testbed.core.errors import TestbedError
from testbed.core.state import GlobalState
from testbed.server.recorder import DeviceTotals, Record


@dataclass
class Checkpoint:
    """What checkpoint.pt holds (under the keys `write_checkpoint` gives)."""

    round: int  # the last round done
    state: GlobalState
    strategy: dict  # Strategy.state_dict()
    clock_s: float  # the run's clock and wall seconds after that round
    wall_s: float
    record: Record
    transport: dict  # Transport.state_dict(): what agents keep between rounds, where this process holds it
    device_state: dict[str, dict]  # every device's fields (speeds are refreshed online on the wall clock)
    rng: dict  # the Python and torch generators' states
    config: dict | None  # the run's config (testbed.core.config.to_dict), to tell whose checkpoint it is;
    # None in a checkpoint written before checkpoints named their config


def capture_rng() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])


def write_checkpoint(out: Path, c: Checkpoint) -> None:
    """Replaces the run's checkpoint at once: a run stopped while writing keeps the previous one."""
    payload = {"round": c.round, "lora": c.state.lora, "head": c.state.head, "strategy": c.strategy,
               "clock_s": c.clock_s, "wall_s": c.wall_s, "rows": c.record.rows,
               "devices": {name: t.as_dict() for name, t in c.record.totals.items()},
               "failures": c.record.failures, "transport": c.transport, "device_state": c.device_state, "rng": c.rng,
               "config": c.config}
    tmp = out / "checkpoint.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, out / "checkpoint.pt")


def load_checkpoint(out: Path) -> Checkpoint:
    path = out / "checkpoint.pt"
    if not path.is_file():
        raise TestbedError(f"{path}: no checkpoint to resume from")
    try:
        c = torch.load(path, weights_only=False)  # our own file: rows, RNG and strategy states
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise TestbedError(f"{path}: unreadable checkpoint: {str(exc).splitlines()[0]}") from None
    totals = {name: DeviceTotals.from_dict(t) for name, t in c["devices"].items()}
    return Checkpoint(round=c["round"], state=GlobalState(c["lora"], c["head"]), strategy=c["strategy"],
                      clock_s=c["clock_s"], wall_s=c["wall_s"], record=Record(c["rows"], totals, c["failures"]),
                      transport=c["transport"], device_state=c["device_state"], rng=c["rng"],
                      config=c.get("config"))
