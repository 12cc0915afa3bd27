"""The `dist` transport: Wire messages between rank 0 (aggregator) and agent ranks over
torch.distributed point-to-point (gloo on CPU).

A message is a length prefix (one int64) then its bytes.  Rank 0 serves each agent rank
from its own thread (send a plan, wait for the update, next device), so a slow or dead
agent never blocks the others: a killed peer surfaces at once as a closed connection, a
hung one at the round's deadline.  Either way its devices are left out of that round and
of later ones (a rank's message stream cannot be resynchronised once a reply is lost).

Joining: each agent rank sends a hello with the profile it measured of its device, then
echoes a few probe buffers, from whose round trips rank 0 measures the link.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from testbed.config import ExperimentConfig
from testbed.errors import TestbedError
from testbed.model import ModelInfo
from testbed.profiler import DeviceProfile, profile_from_dict
from testbed.plan import Update
from testbed.transport import Failure, Job, RoundResult
from testbed.wire import Message, WireError, pack, plan_message, read_update, unpack

log = logging.getLogger("testbed.dist")
# Gloo closes every connection of a process once any one receive times out, so rank 0 never lets
# an update's receive time out: it keeps the round's deadline itself, and a receive from a rank
# that missed it is left waiting (the rank is not used again).
UNBOUNDED_S = 10 * 365 * 24 * 3600.0
MAX_MESSAGE = 1 << 31  # bytes; anything longer is refused before allocating it
PROBES = (1,) * 5 + (1 << 20,) * 3  # echoed at join: latency from the small ones, bandwidth from the large


@dataclass
class Joined:
    """What rank 0 learnt about an agent rank when it joined."""

    rank: int
    devices: list[str]
    profile: DeviceProfile | None  # None when the agent was told not to profile
    bandwidth_mbit: float
    latency_ms: float


def send_bytes(buf: memoryview, dst: int) -> int:
    dist.send(torch.tensor([len(buf)], dtype=torch.int64), dst)
    dist.send(torch.frombuffer(buf, dtype=torch.uint8), dst)
    return len(buf) + 8


def recv_bytes(src: int, wait_s: float = 0.0) -> memoryview:
    """The next message from `src`; `wait_s`: how long its start may take (0: the process
    group's timeout)."""
    n = torch.empty(1, dtype=torch.int64)
    if wait_s:
        dist.irecv(n, src).wait(timedelta(seconds=wait_s))
    else:
        dist.recv(n, src)
    size = int(n.item())
    if not 0 < size <= MAX_MESSAGE:
        raise WireError(f"length prefix {size} from rank {src} is out of range")
    buf = torch.empty(size, dtype=torch.uint8)
    dist.recv(buf, src)
    return memoryview(buf.numpy()).cast("B")


def patience_s(cfg: ExperimentConfig) -> float:
    """How long a rank waits for a peer that is still connected before giving up on it: as long
    as the whole run may take (every round up to its deadline, and as much again for joining).
    Agents join at their own pace (profiling a large model on a slow device takes minutes) and
    then wait for the slowest device of every round, so the deadline alone is too short."""
    return cfg.dist.deadline_s * (cfg.rounds + 2)


def hosts(devices: list[str], agents: int) -> dict[str, int]:
    """Which agent rank serves which device: round-robin in config order."""
    if agents < 1:
        raise TestbedError("dist: at least one agent rank is needed (mpirun -np 2 or more)")
    return {d: 1 + i % agents for i, d in enumerate(devices)}


class DistTransport:
    def __init__(self, devices: list[str], agents: int, key: bytes, wire_dtype: torch.dtype, deadline_s: float,
                 join_wait_s: float = 0.0):
        self.rank_of = hosts(devices, agents)
        self.join_wait_s = join_wait_s  # for each agent's hello (0: the process group's timeout)
        self.agents = agents
        self.key = key
        self.dtype = wire_dtype
        self.deadline_s = deadline_s
        self.lost: dict[int, str] = {}  # rank -> why it is no longer used
        self.seq = dict.fromkeys(self.rank_of.values(), 0)  # per rank: only its own thread touches it

    def join(self, info: ModelInfo) -> dict[int, Joined]:
        """Receive every agent's hello and time its link; a rank that fails here is lost."""
        out = {}
        for rank in range(1, self.agents + 1):
            devices = [d for d, r in self.rank_of.items() if r == rank]
            try:
                msg = unpack(recv_bytes(rank, self.join_wait_s), self.key)
                if msg.kind != "hello":
                    raise WireError(f"expected a hello, got a {msg.kind} message")
                raw = msg.meta.get("profile")
                profile = None if raw is None else profile_from_dict(raw, f"rank {rank}'s profile", info)
                times = []
                for size in PROBES:
                    start = time.perf_counter()
                    send_bytes(memoryview(bytearray(size)), rank)
                    recv_bytes(rank)
                    times.append(time.perf_counter() - start)
            except (WireError, TestbedError, RuntimeError) as exc:
                self.lost[rank] = f"rank {rank}: failed to join: {str(exc).splitlines()[0]}"
                log.warning("%s", self.lost[rank])
                continue
            small, large = statistics.median(times[:5]), statistics.median(times[5:])
            mbit, ms = 2 * 8 * PROBES[-1] / max(large - small, 1e-9) / 1e6, 1000 * small / 2
            if profile is not None:  # the saved profile carries the link too
                profile = dataclasses.replace(profile, bandwidth_mbit=mbit, latency_ms=ms)
            out[rank] = Joined(rank, devices, profile, mbit, ms)
        return out

    def available(self, devices: list[str]) -> list[str]:
        return [d for d in devices if self.rank_of[d] not in self.lost]

    def run_round(self, round: int, jobs: dict[str, Job]) -> RoundResult:
        result = RoundResult()
        by_rank: dict[int, list[str]] = {}
        for device in jobs:
            if self.rank_of[device] in self.lost:
                result.failures.append(Failure(round, device, "lost", self.lost[self.rank_of[device]]))
            else:
                by_rank.setdefault(self.rank_of[device], []).append(device)
        done: dict[str, Update] = {}
        failed: dict[str, tuple[str, str]] = {}  # device -> (kind, detail) a live agent reported
        errors: dict[int, tuple[str, str, str]] = {}  # rank -> (device, kind, detail): the rank is lost
        threads = [threading.Thread(target=self._serve, args=(round, rank, devs, jobs, done, errors, failed),
                                    daemon=True)
                   for rank, devs in by_rank.items()]
        for t in threads:
            t.start()
        end = time.monotonic() + self.deadline_s
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        for rank, devs in by_rank.items():
            for device in devs:
                if device in done:
                    result.updates[device] = done[device]
                    continue
                if device in failed:
                    kind, detail = failed[device]
                    log.warning("round %d: device %s (rank %d): %s: %s", round, device, rank, kind, detail)
                    result.failures.append(Failure(round, device, kind, detail))
                    continue
                kind, detail = "timeout", f"no update within the {self.deadline_s:g} s deadline"
                if rank in errors:
                    _, kind, detail = errors[rank]
                self.lost.setdefault(rank, f"rank {rank}: {kind}: {detail}")
                log.warning("round %d: device %s (rank %d) failed: %s: %s", round, device, rank, kind, detail)
                result.failures.append(Failure(round, device, kind, detail))
        return result

    def _serve(self, round: int, rank: int, devices: list[str], jobs: dict[str, Job],
               done: dict[str, Update], errors: dict, failed: dict) -> None:
        for device in devices:
            job = jobs[device]
            self.seq[rank] += 1
            try:
                sent = send_bytes(pack(plan_message(round, device, self.seq[rank], job.plan, job.lora, job.head),
                                       self.key, self.dtype), rank)
                buf = recv_bytes(rank, UNBOUNDED_S)
                reply = self._check(unpack(buf, self.key), round, device)
                if reply.kind == "failure":  # the device could not train this plan; the rank goes on
                    failed[device] = (str(reply.meta.get("kind", "error")), str(reply.meta.get("detail", "")))
                    continue
                update = read_update(reply)
            except WireError as exc:
                log.warning("round %d: rejected the reply of %s (rank %d): %s", round, device, rank, exc)
                errors[rank] = (device, "rejected", str(exc))
                return
            except RuntimeError as exc:  # gloo: connection closed by a dead peer
                errors[rank] = (device, "crash", str(exc).splitlines()[0][-200:])
                return
            update.report.bytes_down = sent
            update.report.bytes_up = len(buf) + 8
            done[device] = update

    @staticmethod
    def _check(msg: Message, round: int, device: str) -> Message:
        if msg.kind not in ("update", "failure") or msg.round != round or msg.device != device:
            raise WireError(f"expected the update of {device} for round {round}, "
                            f"got {msg.kind} of {msg.device} for round {msg.round}")
        return msg

    def state_dict(self) -> dict:
        return {}  # personal layers live in the agent processes

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        for rank in sorted(set(range(1, self.agents + 1)) - set(self.lost)):
            try:
                send_bytes(pack(Message("bye", -1, "", 0, {}, {}), self.key), rank)
            except RuntimeError:
                pass  # already gone; nothing left to tell it
