"""The `dist` transport: Wire messages between rank 0 (aggregator) and agent ranks over
torch.distributed point-to-point (gloo on CPU), each framed by testbed.comm.framing.

Rank 0 keeps an `AgentRank` for every agent rank: the sequence number of the plans it sent
that rank, the thread that serves the rank's devices in a round (send a plan, wait for the
update, next device) and what came of it.  A slow or dead agent therefore never blocks the
others: a killed peer surfaces at once as a closed connection, a hung one at the round's
deadline.  Either way its devices are left out of that round.  A rank whose reply is lost
(dead, or refused) stays out for the rest of the run: its message stream cannot be
resynchronised.  A hung rank is late: its thread goes on waiting for the reply, and the rank
is not served meanwhile; if the reply comes after all, it is dropped, the stream is in step
again, and the rank's devices rejoin from the next round that starts after it.

Joining (testbed.comm.join): each agent rank sends a hello with the profile it measured of its
device, then echoes a few probe buffers, from whose round trips rank 0 measures the link.  A
rank that fails to join is lost, and its devices are recorded as such in the first round.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field

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
# that missed it is left waiting (the rank is late).
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


@dataclass
class Outcome:
    """What serving an agent rank in one round came to (its thread fills it in)."""

    updates: dict[str, Update] = field(default_factory=dict)
    failed: dict[str, Failure] = field(default_factory=dict)  # what the agent reported; the rank goes on
    error: tuple[str, str] | None = None  # (kind, detail) of the reply that cost the rank its stream


class AgentRank:
    """Rank 0's side of one agent rank.  Its `seq` and `outcome` are written only by its thread,
    and a rank has one thread at a time: a late one is not served again until its thread ends."""

    def __init__(self, rank: int, devices: list[str], key: bytes, wire_dtype: torch.dtype):
        self.rank = rank
        self.devices = devices  # the devices it serves, in config order
        self.key = key
        self.dtype = wire_dtype
        self.seq = 0  # of the last plan sent: the agent refuses replays, rank 0 stale replies
        self.thread: threading.Thread | None = None
        self.outcome = Outcome()
        self.late = False  # its thread still waits for a reply that missed a round's deadline
        self.lost: str | None = None  # why it is no longer used

    @property
    def in_step(self) -> bool:
        return self.lost is None and not self.late

    def join(self, info: ModelInfo, wait_s: float) -> Joined:
        """Its hello, and its link timed; WireError, TestbedError or RuntimeError (gloo) if it fails."""
        hello = receive_hello(self.rank, self.key, info, wait_s)
        mbit, ms = time_link(self.rank)
        profile = hello.profile
        if profile is not None:  # the saved profile carries the link too
            profile = dataclasses.replace(profile, bandwidth_mbit=mbit, latency_ms=ms)
        return Joined(self.rank, list(self.devices), profile, mbit, ms, hello.memory, hello.device)

    def start(self, round: int, jobs: dict[str, Job], end: float) -> None:
        """Serve `jobs` (devices of this rank) in a thread of its own, until `end` (monotonic)."""
        self.outcome = Outcome()
        self.thread = threading.Thread(target=self._serve, args=(round, jobs, end, self.outcome), daemon=True)
        self.thread.start()

    def wait(self, end: float) -> None:
        self.thread.join(max(0.0, end - time.monotonic()))

    def _serve(self, round: int, jobs: dict[str, Job], end: float, out: Outcome) -> None:
        for device, job in jobs.items():
            if time.monotonic() > end:  # past the deadline: the remaining devices wait for a later round
                return
            self.seq += 1
            try:
                sent = send_bytes(pack(plan_message(round, device, self.seq, job.plan, job.lora, job.head),
                                       self.key, self.dtype), self.rank)
                buf = recv_bytes(self.rank, UNBOUNDED_S)
                reply = self.receive(buf, round, device, self.seq)
            except WireError as exc:
                log.warning("round %d: rejected the reply of %s (rank %d): %s", round, device, self.rank, exc)
                out.error = ("rejected", str(exc))
                return
            except RuntimeError as exc:  # gloo: connection closed by a dead peer
                out.error = ("crash", str(exc).splitlines()[0][-200:])
                return
            if isinstance(reply, Failure):  # the device could not train this plan; the rank goes on
                out.failed[device] = reply
                continue
            reply.report.bytes_down = sent
            reply.report.bytes_up = LENGTH_PREFIX + len(buf)
            out.updates[device] = reply

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

    def settle(self, round: int, devices: list[str], deadline_s: float, result: RoundResult) -> None:
        """Add the round's outcome for `devices` to `result`, once the deadline is past.  A device
        with neither update nor failure failed with the rank's error (the rank is lost), or timed
        out (if the thread still waits for its reply, the rank is late)."""
        out = self.outcome
        for device in devices:
            if device in out.updates:
                result.updates[device] = out.updates[device]
                continue
            if device in out.failed:
                failure = out.failed[device]
                log.warning("round %d: device %s (rank %d): %s: %s", round, device, self.rank, failure.kind,
                            failure.detail)
                result.failures.append(failure)
                continue
            kind, detail = "timeout", f"no update within the {deadline_s:g} s deadline"
            if out.error is not None:
                kind, detail = out.error
                self.lost = self.lost or f"rank {self.rank}: {kind}: {detail}"
            elif self.thread.is_alive():  # may still answer: see catch_up()
                self.late = True
            log.warning("round %d: device %s (rank %d) failed: %s: %s", round, device, self.rank, kind, detail)
            result.failures.append(Failure(round, device, kind, detail))

    def catch_up(self) -> None:
        """A late rank whose thread has ended is back in step if it read its reply, lost if not."""
        if not self.late or self.thread.is_alive():
            return
        self.late = False
        if self.outcome.error is not None:
            kind, detail = self.outcome.error
            self.lost = f"rank {self.rank}: {kind}: {detail}"
            log.warning("%s", self.lost)
        else:
            log.warning("rank %d answered after the deadline (reply dropped); its devices rejoin", self.rank)

    def bye(self) -> None:
        try:
            send_bytes(pack(Message("bye", -1, "", 0, {}, {}), self.key), self.rank)
        except RuntimeError:
            pass  # already gone; nothing left to tell it


class DistTransport:
    def __init__(self, devices: list[str], agents: int, key: bytes, wire_dtype: torch.dtype, deadline_s: float,
                 join_wait_s: float = 0.0):
        self.rank_of = hosts(devices, agents)
        self.ranks = {r: AgentRank(r, [d for d in devices if self.rank_of[d] == r], key, wire_dtype)
                      for r in range(1, agents + 1)}
        self.join_wait_s = join_wait_s  # for each agent's hello (0: the process group's timeout)
        self.deadline_s = deadline_s
        self.personal: set[str] = set()  # devices whose agents hold personal layers
        self.unjoined: list[tuple[str, str]] = []  # (device, why) of ranks that failed to join: reported once

    def join(self, info: ModelInfo) -> dict[int, Joined]:
        """Receive every agent's hello and time its link; a rank that fails here is lost."""
        out = {}
        for agent in self.ranks.values():
            try:
                out[agent.rank] = agent.join(info, self.join_wait_s)
            except (WireError, TestbedError, RuntimeError) as exc:
                agent.lost = f"rank {agent.rank}: failed to join: {str(exc).splitlines()[0]}"
                log.warning("%s", agent.lost)
                self.unjoined += [(d, agent.lost) for d in agent.devices]
        return out

    def available(self, devices: list[str]) -> list[str]:
        """Devices whose rank is in step (late ranks caught up first)."""
        for agent in self.ranks.values():
            agent.catch_up()
        return [d for d in devices if self.ranks[self.rank_of[d]].in_step]

    def run_round(self, round: int, jobs: dict[str, Job]) -> RoundResult:
        result = RoundResult(failures=[Failure(round, d, "join", why) for d, why in self.unjoined])
        self.unjoined = []
        self.personal.update(d for d, job in jobs.items() if any(job.plan.ranks.get(l, 0) > 0
                                                                 for l in job.plan.personal))
        serving: dict[int, dict[str, Job]] = {}  # rank -> its devices' jobs
        for device, job in jobs.items():
            agent = self.ranks[self.rank_of[device]]
            if agent.in_step:
                serving.setdefault(agent.rank, {})[device] = job
            else:
                why = agent.lost or f"rank {agent.rank}: still busy with an earlier round"
                result.failures.append(Failure(round, device, "lost", why))
        end = time.monotonic() + self.deadline_s
        for rank, mine in serving.items():
            self.ranks[rank].start(round, mine, end)
        for rank in serving:
            self.ranks[rank].wait(end)
        for rank, mine in serving.items():
            self.ranks[rank].settle(round, list(mine), self.deadline_s, result)
        return result

    def state_dict(self) -> dict:
        return {PERSONAL_ON_AGENTS: sorted(self.personal)}  # the layers themselves live in the agent processes

    def load_state_dict(self, state: dict) -> None:
        check_resumable(state)

    def close(self) -> None:
        for agent in self.ranks.values():
            if agent.lost is None:  # late ones too: they may come back
                agent.bye()


def check_resumable(state: dict) -> None:
    """A distributed run resumes with fresh agent processes: exactly, unless its devices kept
    personal layers, which only agents held (a dist run's) or which agents cannot be handed
    (an in-process run's)."""
    if PERSONAL_ON_AGENTS not in state and any(state.values()):
        raise TestbedError("--resume: this in-process run's devices keep personal layers, which agent ranks "
                           "cannot be handed; resume it in-process")
    refuse_lost_personal(state)
