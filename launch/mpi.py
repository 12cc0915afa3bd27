"""Entry point for a distributed run: rank 0 aggregates, ranks 1..N are agents.

    mpirun --enable-recovery -np N+1 .venv/bin/python -m launch.mpi CONFIG [--set K=V]...
        [--out DIR [--force] | --resume DIR]

Ranks come from Open MPI (OMPI_COMM_WORLD_*), MPICH/PMI (PMI_*) or torchrun (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT).  Under MPI, rank 0 picks a free port and shares
it, with the run's secret, through mpi4py; torch.distributed (gloo) then carries every
message.  `--enable-recovery` keeps mpirun from tearing the job down when one agent
dies, so the aggregator can finish the run without it.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from launch.net import free_port, interface_address, route_interface
from testbed.comm.distributed import DistTransport, patience_s
from testbed.comm.join import Joined
from testbed.core.config import ExperimentConfig, load_config
from testbed.core.errors import TestbedError
from testbed.data import write_labels
from testbed.experiments.setup import setup
from testbed.server.experiment import Experiment
from testbed.server.loop import RoundLoop
from testbed.server.rundir import RunDir

log = logging.getLogger("testbed.launch")


def world() -> tuple[int, int, str]:
    """(rank, size, launcher) from whichever launcher started us."""
    for rank_var, size_var, launcher in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "mpi"),
                                         ("PMI_RANK", "PMI_SIZE", "mpi"),
                                         ("RANK", "WORLD_SIZE", "torchrun")):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var]), launcher
    raise TestbedError("launch.mpi: no rank in the environment; start it with mpirun, mpiexec or torchrun")


def rendezvous(cfg: ExperimentConfig, rank: int, size: int, launcher: str) -> bytes:
    """Join the process group; return the run's message key."""
    if cfg.dist.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = cfg.dist.ifname
    timeout = timedelta(seconds=max(60.0, cfg.dist.deadline_s))
    if launcher == "torchrun":
        if not cfg.dist.ifname and "GLOO_SOCKET_IFNAME" not in os.environ and os.environ.get("MASTER_ADDR"):
            # gloo would otherwise bind to the address of this machine's name, which a host in
            # another network (or namespace) may not reach
            os.environ["GLOO_SOCKET_IFNAME"] = route_interface(os.environ["MASTER_ADDR"])
        dist.init_process_group(cfg.dist.backend, rank=rank, world_size=size, timeout=timeout)
        return read_secret()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    info = None
    if rank == 0:
        addr = cfg.dist.master_addr or (interface_address(cfg.dist.ifname) if cfg.dist.ifname else "127.0.0.1")
        info = (addr, cfg.dist.master_port or free_port(addr), read_secret(default=secrets.token_bytes(32)))
    addr, port, key = comm.bcast(info, root=0)
    dist.init_process_group(cfg.dist.backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=size,
                            timeout=timeout)
    return key


def read_secret(default: bytes | None = None) -> bytes:
    """The run's secret comes from a file (never argv or the environment's value itself)."""
    path = os.environ.get("TESTBED_SECRET_FILE")
    if path:
        try:
            return Path(path).read_bytes().strip()
        except OSError as exc:
            raise TestbedError(f"TESTBED_SECRET_FILE: cannot read {path}: {exc.strerror}") from None
    if default is None:
        raise TestbedError("TESTBED_SECRET_FILE: set it to a file holding the run's secret (every rank reads it)")
    return default


DEVICE_VAR = "TESTBED_DEVICE"  # a rank's model.device, in place of the config's


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.mpi", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--out", help="run directory on rank 0 (default: runs/<config name>-<time>)")
    where.add_argument("--resume", metavar="DIR", help="continue the run in DIR after its last complete round")
    ap.add_argument("--force", action="store_true", help="--out: replace the run DIR holds")
    args = ap.parse_args(argv)
    try:
        rank, size, launcher = world()
        logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
        cfg = load_config(args.config, args.set)
        if cfg.dist.threads:
            cfg.model.threads = cfg.dist.threads
        if device := os.environ.get(DEVICE_VAR):  # this host's own (an inventory's testbed_device)
            cfg.model.device = device
        key = rendezvous(cfg, rank, size, launcher)
        if rank == 0:
            run_aggregator(cfg, size - 1, key, args)
        else:
            from launch.worker import serve

            serve(cfg, rank, size - 1, key)
    except TestbedError as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, which mpirun passes on: the checkpoint stands
        return 130
    return 0


def run_aggregator(cfg: ExperimentConfig, agents: int, key: bytes, args: argparse.Namespace) -> None:
    out = Path(args.resume or args.out or
               Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    exp = setup(cfg)
    transport = DistTransport(list(exp.devices), agents, key, getattr(torch, cfg.wire.dtype), cfg.dist.deadline_s,
                              patience_s(cfg))
    try:
        joined = transport.join(exp.info)
        # The directory is taken here too for torchrun users; after joining, so that the agents are told bye.
        with RunDir.take(out, cfg, bool(args.resume), args.force):
            use_measured(exp, joined, out / "profiles")
            loop = RoundLoop(exp, transport, out, resume=bool(args.resume))
            write_labels(exp.data.label_names, out)
            loop.run()
    finally:
        transport.close()


def use_measured(exp: Experiment, joined: dict[int, Joined], folder: Path) -> None:
    """Keep each agent's profile with the run; plan within the memory it measured (on either
    clock: a configured budget above it would be killed); on the wall clock, plan with its
    measured speed and link too (the modelled clock keeps the configured device classes: it
    simulates them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank, j in joined.items():
        saved = folder / f"rank-{rank}.yaml"
        if j.profile is not None:
            j.profile.save(saved)
        speed = j.profile.speed(exp.cost.profile) if j.profile else 0.0
        log.info("rank %d (%s): on %s, %s link %.0f Mbit/s, %.2f ms", rank, ", ".join(j.devices) or "no device",
                 j.device or "an unnamed device", f"{speed:.2f}x the reference," if speed else "not profiled,",
                 j.bandwidth_mbit, j.latency_ms)
        budget = j.memory.budget_mb() if j.memory else None
        if budget is not None:  # real memory binds on either clock: a plan past it is killed
            log.info("rank %d: memory limit %.0f MiB, %.0f MiB in use at join, %.0f MiB at its profiled step "
                     "(%.0f MiB counted): training budget %.0f MiB counted", rank, j.memory.limit_mb, j.memory.base_mb,
                     j.memory.peak_mb, j.memory.counted_mb, budget)
            for name in j.devices:
                exp.devices[name].memory_mb = min(exp.devices[name].memory_mb, budget)
        if exp.cfg.clock != "wall":
            continue
        for name in j.devices:
            device = exp.devices[name]
            if speed:  # measured in the run's precision: the cost model adds no class speedup
                device.speed, device.profile = speed, str(saved)
            device.bandwidth_mbit, device.latency_ms = j.bandwidth_mbit, j.latency_ms


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:  # a bug must still end the process, or its peers wait on it forever
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip MPI/gloo teardown, which can hang on a peer that died
