"""The `dist` transport: Wire messages between rank 0 (aggregator) and agent ranks over
torch.distributed point-to-point (gloo on CPU).

A message is a length prefix (one int64) then its bytes.  Rank 0 serves each agent rank
from its own thread (send a plan, wait for the update, next device), so a slow or dead
agent never blocks the others: a killed peer surfaces at once as a closed connection, a
hung one at the round's deadline.  Either way its devices are left out of that round.  A
rank whose reply is lost (dead, or refused) stays out for the rest of the run: its message
stream cannot be resynchronised.  A hung rank's thread goes on waiting for the reply: if it
comes after all, it is dropped, the stream is in step again, and the rank's devices rejoin
from the next round that starts after it.

Joining (testbed.comm.join): each agent rank sends a hello with the profile it measured of its device, then
echoes a few probe buffers, from whose round trips rank 0 measures the link.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from testbed.comm.framing import LENGTH_PREFIX, recv_bytes, send_bytes
from testbed.comm.join import Joined, receive_hello, time_link
from testbed.comm.transport import (PERSONAL_ON_AGENTS, Failure, Job,
                                    RoundResult, refuse_lost_personal)
from testbed.comm.wire import (Message, WireError, pack, plan_message,
                               read_update, unpack)
from testbed.core.config import ExperimentConfig
from testbed.core.errors import TestbedError
from testbed.core.plan import Update
from testbed.model.info import ModelInfo

log = logging.getLogger("testbed.dist")
# Gloo closes every connection of a process once any one receive times out, so rank 0 never lets
# an update's receive time out: it keeps the round's deadline itself, and a receive from a rank
# that missed it is left waiting (the rank is not used again).
UNBOUNDED_S = 10 * 365 * 24 * 3600.0


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
        self.late: dict[int, tuple[threading.Thread, dict]] = {}  # rank -> its thread past a deadline, its errors
        self.personal: set[str] = set()  # devices whose agents hold personal layers
        self.unjoined: list[tuple[str, str]] = []  # (device, why) of ranks that failed to join: reported once
        self.seq = dict.fromkeys(self.rank_of.values(), 0)  # per rank: only its own thread touches it

    def join(self, info: ModelInfo) -> dict[int, Joined]:
        """Receive every agent's hello and time its link; a rank that fails here is lost."""
        out = {}
        for rank in range(1, self.agents + 1):
            devices = [d for d, r in self.rank_of.items() if r == rank]
            try:
                hello = receive_hello(rank, self.key, info, self.join_wait_s)
                mbit, ms = time_link(rank)
            except (WireError, TestbedError, RuntimeError) as exc:
                self.lost[rank] = f"rank {rank}: failed to join: {str(exc).splitlines()[0]}"
                log.warning("%s", self.lost[rank])
                self.unjoined += [(d, self.lost[rank]) for d in devices]
                continue
            profile = hello.profile
            if profile is not None:  # the saved profile carries the link too
                profile = dataclasses.replace(profile, bandwidth_mbit=mbit, latency_ms=ms)
            out[rank] = Joined(rank, devices, profile, mbit, ms, hello.memory)
        return out

    def available(self, devices: list[str]) -> list[str]:
        """Devices whose rank is in step.  A late rank whose thread has since read its reply is
        back; one whose thread failed is lost."""
        for rank, (thread, errors) in list(self.late.items()):
            if thread.is_alive():
                continue
            del self.late[rank]
            if rank in errors:
                _, kind, detail = errors[rank]
                self.lost[rank] = f"rank {rank}: {kind}: {detail}"
                log.warning("%s", self.lost[rank])
            else:
                log.warning("rank %d answered after the deadline (reply dropped); its devices rejoin", rank)
        return [d for d in devices if self.rank_of[d] not in self.lost and self.rank_of[d] not in self.late]

    def run_round(self, round: int, jobs: dict[str, Job]) -> RoundResult:
        result = RoundResult(failures=[Failure(round, d, "join", why) for d, why in self.unjoined])
        self.unjoined = []
        by_rank: dict[int, list[str]] = {}
        self.personal.update(d for d, job in jobs.items() if any(job.plan.ranks.get(l, 0) > 0
                                                                 for l in job.plan.personal))
        for device in jobs:
            rank = self.rank_of[device]
            if rank in self.lost or rank in self.late:
                why = self.lost.get(rank, f"rank {rank}: still busy with an earlier round")
                result.failures.append(Failure(round, device, "lost", why))
            else:
                by_rank.setdefault(rank, []).append(device)
        done: dict[str, Update] = {}
        failed: dict[str, tuple[str, str]] = {}  # device -> (kind, detail) a live agent reported
        errors: dict[int, tuple[str, str, str]] = {}  # rank -> (device, kind, detail): the rank is lost
        end = time.monotonic() + self.deadline_s
        threads = {rank: threading.Thread(target=self._serve, args=(round, rank, devs, jobs, done, errors, failed, end),
                                          daemon=True)
                   for rank, devs in by_rank.items()}
        for t in threads.values():
            t.start()
        for t in threads.values():
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
                elif threads[rank].is_alive():  # may still answer: see available()
                    self.late[rank] = (threads[rank], errors)
                log.warning("round %d: device %s (rank %d) failed: %s: %s", round, device, rank, kind, detail)
                result.failures.append(Failure(round, device, kind, detail))
        return result

    def _serve(self, round: int, rank: int, devices: list[str], jobs: dict[str, Job],
               done: dict[str, Update], errors: dict, failed: dict, end: float) -> None:
        for device in devices:
            if time.monotonic() > end:  # past the deadline: the rank's remaining devices wait for a later round
                return
            job = jobs[device]
            self.seq[rank] += 1
            try:
                sent = send_bytes(pack(plan_message(round, device, self.seq[rank], job.plan, job.lora, job.head),
                                       self.key, self.dtype), rank)
                buf = recv_bytes(rank, UNBOUNDED_S)
                reply = self.receive(buf, round, device, self.seq[rank])
                if isinstance(reply, Failure):  # the device could not train this plan; the rank goes on
                    failed[device] = (reply.kind, reply.detail)
                    continue
                update = reply
            except WireError as exc:
                log.warning("round %d: rejected the reply of %s (rank %d): %s", round, device, rank, exc)
                errors[rank] = (device, "rejected", str(exc))
                return
            except RuntimeError as exc:  # gloo: connection closed by a dead peer
                errors[rank] = (device, "crash", str(exc).splitlines()[0][-200:])
                return
            update.report.bytes_down = sent
            update.report.bytes_up = LENGTH_PREFIX + len(buf)
            done[device] = update

    def receive(self, buf: memoryview, round: int, device: str, seq: int) -> Update | Failure:
        """The reply to plan `seq` (for `device` in `round`): its update, or the failure its agent
        reported.  WireError for anything else: a bad digest or format, another kind, device,
        round or sequence number (a replay), tensors not in the run's wire dtype."""
        msg = unpack(buf, self.key)
        if msg.kind not in ("update", "failure") or (msg.round, msg.device, msg.seq) != (round, device, seq):
            raise WireError(f"expected the update of {device} for round {round} (message {seq}), "
                            f"got {msg.kind} of {msg.device!r} for round {msg.round} (message {msg.seq})")
        if msg.kind == "failure":
            return Failure(round, device, str(msg.meta.get("kind", "error")), str(msg.meta.get("detail", "")))
        return read_update(msg, self.dtype)

    def state_dict(self) -> dict:
        return {PERSONAL_ON_AGENTS: sorted(self.personal)}  # the layers themselves live in the agent processes

    def load_state_dict(self, state: dict) -> None:
        check_resumable(state)

    def close(self) -> None:
        for rank in sorted(set(range(1, self.agents + 1)) - set(self.lost)):  # late ones too: they may come back
            try:
                send_bytes(pack(Message("bye", -1, "", 0, {}, {}), self.key), rank)
            except RuntimeError:
                pass  # already gone; nothing left to tell it


def check_resumable(state: dict) -> None:
    """A distributed run resumes with fresh agent processes: exactly, unless its devices kept
    personal layers, which only agents held (a dist run's) or which agents cannot be handed
    (an in-process run's)."""
    if PERSONAL_ON_AGENTS not in state and any(state.values()):
        raise TestbedError("--resume: this in-process run's devices keep personal layers, which agent ranks "
                           "cannot be handed; resume it in-process")
    refuse_lost_personal(state)
