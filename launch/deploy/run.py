"""One deployed run, in order: check the hosts (preflight), push what the run takes (payload),
start rank 0 and then the agents at one rendezvous point (ranks), wait for rank 0, and at the
end, on Ctrl-C or on any failure, stop every rank and remove the hosts' run directories."""
from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from launch.deploy.hosts import (Session, clear_leftover, fetch_run,
                                 host_command, last_line, memory_state,
                                 parallel, remove_run)
from launch.deploy.payload import (named_files, push, run_config, run_state,
                                   write_here)
from launch.deploy.preflight import agent_modules, known_hosts, open_sessions
from launch.deploy.ranks import LocalRank, Rank, RemoteRank, wait
from launch.inventory import load_inventory
from launch.mpi import DEVICE_VAR
from launch.net import free_port, route_address
from launch.ssh import HostProblem, where
from testbed.core.config import ExperimentConfig, load_config
from testbed.core.errors import TestbedError
from testbed.core.files import atomic_write

PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")  # same offline mode everywhere


@dataclass
class DeployOptions:
    inventory: str
    config: str
    out: Path
    known_hosts: Path | None  # None: each host's testbed_known_hosts, else ~/.ssh/known_hosts
    sets: list[str] = field(default_factory=list)
    accept_new_host_keys: bool = False
    bootstrap: bool = False
    check_only: bool = False
    resume: bool = False  # continue the run in `out` after its last complete round


def deploy(opts: DeployOptions) -> int:
    hosts = load_inventory(opts.inventory)
    cfg = load_config(opts.config, opts.sets)
    agents = [h for h in hosts if h.role == "agent"]
    if not agents:
        raise TestbedError(f"{opts.inventory}: no agent hosts (every host has testbed_role=aggregator)")
    known = known_hosts(hosts, opts.known_hosts, opts.accept_new_host_keys)
    sessions = open_sessions(hosts, known, agent_modules(cfg), opts.bootstrap)
    try:
        if opts.check_only:
            return 0
        return run_deployed(opts, cfg, sessions)
    finally:
        for s in sessions.values():
            s.client.close()


def run_deployed(opts: DeployOptions, cfg: ExperimentConfig, sessions: dict[str, Session]) -> int:
    start = time.monotonic()
    agents = [s for s in sessions.values() if s.host.role == "agent"]
    aggregator = next((s for s in sessions.values() if s.host.role == "aggregator"), None)
    raw = run_config(cfg, [s.host for s in agents])
    files = named_files(raw)
    if opts.resume:
        parallel(lambda s: clear_leftover(s, opts.out, s is aggregator), list(sessions.values()))
        if not (opts.out / "checkpoint.pt").is_file():
            raise TestbedError(f"--resume: {opts.out} holds no checkpoint: no round of that run completed")
    secret = secrets.token_bytes(32).hex().encode()  # hex: the file is read back stripped of whitespace
    (opts.out / "agents").mkdir(parents=True, exist_ok=True)
    print(f"testbed: run directory {opts.out}", file=sys.stderr)
    ranks: list[Rank] = []
    causes: dict[str, str] = {}  # host -> what killed its agent, where the host can tell
    local_dir = Path(tempfile.mkdtemp(prefix="testbed-deploy-"))  # 0700: rank 0's config and secret here
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        state = run_state(opts.out) if opts.resume else []

        def prepare(s: Session) -> int:
            sent = push(s, opts.out.name, raw, files, secret, state if s is aggregator else [])
            s.memory = memory_state(s)  # what its rank starts from, to tell an OOM kill later
            return sent

        pushed = parallel(prepare, list(sessions.values()))
        print(f"testbed: pushed the project and {len(files)} named files to {len(sessions)} hosts "
              f"({sum(pushed) / 2**20:.1f} MiB, {time.monotonic() - start:.1f} s)", file=sys.stderr)
        env = rendezvous_env(cfg, aggregator, agents)
        log = opts.out / "aggregator.log"
        if aggregator:
            ranks.append(RemoteRank.start(aggregator, 0, env | host_env(aggregator), log, echo=True,
                                          resume=opts.resume))
        else:
            config, secret_file = write_here(raw, files, secret, local_dir)
            ranks.append(LocalRank.start(config, secret_file, opts.out, opts.resume, env, log))
        for i, s in enumerate(agents, 1):  # each appended as it starts, so that a failure stops those up
            ranks.append(RemoteRank.start(s, i, env | host_env(s), opts.out / "agents" / f"{s.host.name}.log"))
        print(f"testbed: started rank 0 {'on ' + aggregator.host.name if aggregator else 'here'} and "
              f"{len(agents)} agents in {time.monotonic() - start:.1f} s", file=sys.stderr)
        code = wait(ranks, causes)
        if code != 0:
            print(f"testbed: error: the aggregator (rank 0) exited with status {code}; see {ranks[0].log}",
                  file=sys.stderr)
            return 1
        print(f"testbed: run finished in {time.monotonic() - start:.1f} s: {opts.out}", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(ranks, sessions, aggregator, opts.out)
        record_causes(opts.out, causes)
        for path in local_dir.iterdir():
            path.unlink()
        local_dir.rmdir()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def rendezvous_env(cfg: ExperimentConfig, aggregator: Session | None, agents: list[Session]) -> dict[str, str]:
    """What every rank's environment adds: torchrun's world, at rank 0's address and port."""
    addr, port = rendezvous_point(cfg, aggregator, agents)
    print(f"testbed: rendezvous at {addr}:{port}", file=sys.stderr)
    return {"WORLD_SIZE": str(len(agents) + 1), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
            "PYTHONUNBUFFERED": "1", **{k: os.environ[k] for k in PASSED_ENV if k in os.environ}}


def host_env(s: Session) -> dict[str, str]:
    """What one host's rank adds: its own model.device (testbed_device), where the inventory names one."""
    return {DEVICE_VAR: s.host.device} if s.host.device else {}


def rendezvous_point(cfg: ExperimentConfig, aggregator: Session | None, agents: list[Session]) -> tuple[str, int]:
    """Rank 0's address as the agents reach it, and a free port there."""
    if aggregator is None:
        addr = cfg.dist.master_addr or route_address(agents[0].host.address)
        return addr, cfg.dist.master_port or free_port(addr)
    addr = cfg.dist.master_addr or aggregator.host.address
    if cfg.dist.master_port:
        return addr, cfg.dist.master_port
    res = host_command(aggregator.client, aggregator.python, "port", [aggregator.run_dir])
    if res.status != 0:
        raise TestbedError(f"{where(aggregator.host)}: cannot pick a free port: {last_line(res.output)}")
    return addr, int(res.output.split()[-1])


def stop(ranks: list[Rank], sessions: dict[str, Session], aggregator: Session | None, out: Path) -> None:
    """Stop every rank (here first), keep the remote aggregator's run, remove the run directories."""
    start = time.monotonic()
    if running := sum(r.poll() is None for r in ranks):
        print(f"testbed: stopping {running} running ranks", file=sys.stderr)
    for r in ranks:
        if isinstance(r, LocalRank):
            r.stop()
    on_host = {r.session.host.name: r for r in ranks if isinstance(r, RemoteRank)}
    made = [s for s in sessions.values() if s.run_dir]

    def one(s: Session) -> str:
        rank = on_host.get(s.host.name)
        try:
            stopped = rank.stop() if rank else True  # none was started there
            if s is aggregator:
                fetch_run(s, out)
            remove_run(s, s.run_dir)
        except (HostProblem, OSError, paramiko.SSHException) as exc:
            return f"{where(s.host)}: could not stop its rank and remove {s.run_dir}: {exc or 'connection lost'}"
        return "" if stopped else f"{where(s.host)}: its rank did not stop"

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(made)))) as pool:
        for problem in pool.map(one, made):
            if problem:
                print(f"testbed: warning: {problem}", file=sys.stderr)
    for r in ranks:
        r.end_output()
    if made:
        print(f"testbed: stopped the ranks and removed the run directories on {len(made)} hosts "
              f"({time.monotonic() - start:.1f} s)", file=sys.stderr)


def record_causes(out: Path, causes: dict[str, str]) -> None:
    """Add what hosts said of their agents' deaths to the failures rank 0 recorded in summary.json."""
    path = out / "summary.json"
    if not causes or not path.is_file():
        return
    summary = json.loads(path.read_text())
    for failure in summary["failures"]:
        if failure["kind"] == "crash" and failure["device"] in causes:
            failure["cause"] = causes[failure["device"]]
    atomic_write(path, (json.dumps(summary, indent=2) + "\n").encode())
