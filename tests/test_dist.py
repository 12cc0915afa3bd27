"""The dist transport with real processes: mpirun, torch.distributed (gloo), SIGKILL, namespaces."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.cmdline import mpirun_command
from launch.faults.inject import rank_pids, wait_for
from launch.net import free_port
from testbed.core.config import from_dict
from testbed.core.plan import Plan
from testbed.experiments.run import run_inprocess
from testbed.experiments.runs import read_rows
from testbed.experiments.setup import setup
from testbed.measure.profiler import load_profile
from testbed.model.info import model_info
from testbed.model.load import load_backbone
from testbed.model.tiny import tiny_config
from testbed.server.loop import make_strategy
from testbed.server.strategies.legend import candidates
from tests.helpers import ENV, LM, ROOT, write_config

pytestmark = pytest.mark.dist


def mpirun(config: Path, out: Path, agents: int, sets=(), timeout=300) -> subprocess.CompletedProcess:
    cmd = mpirun_command(str(config), list(sets), out, agents)
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_mpirun_three_ranks_two_rounds(tiny_bert, tmp_path):
    config = write_config(tmp_path, tiny_config(tiny_bert, devices={"laptop": 2}))
    proc = mpirun(config, tmp_path / "out", agents=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["failures"] == [] and summary["final_accuracy"] is not None
    for r in read_rows(tmp_path / "out"):
        assert len(r["devices"]) == 2 and r["bytes_up"] > 0 and r["bytes_down"] > 0
    # each agent profiled its device when it joined, and rank 0 timed its link
    info = model_info(load_backbone(from_dict(tiny_config(tiny_bert)).model, 4, seed=0))
    for rank in (1, 2):
        p = load_profile(tmp_path / "out" / "profiles" / f"rank-{rank}.yaml", info)
        assert p.source == "measured" and p.bandwidth_mbit > 0 and p.latency_ms > 0
        assert all(t > 0 for t in p.forward_frozen_s)
        assert (p.device, p.precision) == ("cpu", "fp32")
    assert "x the reference" in proc.stderr and "on cpu, fp32" in proc.stderr  # what each agent's hello said


def test_the_secret_stays_out_of_argv_logs_and_the_run_directory(tiny_bert, tmp_path, monkeypatch):
    from launch.mpi import read_secret

    secret = "b7c1e0d4f9a2-run-secret-3e8d"
    (tmp_path / "secret").write_text(secret)
    (tmp_path / "secret").chmod(0o600)
    monkeypatch.setenv("TESTBED_SECRET_FILE", str(tmp_path / "secret"))
    assert read_secret(default=b"unused") == secret.encode()  # rank 0 keys the run with it
    config = write_config(tmp_path, tiny_config(tiny_bert, rounds=1, devices={"laptop": 2}))
    cmd = mpirun_command(str(config), [], tmp_path / "out", 2)
    proc = subprocess.run(cmd, env={**ENV, "TESTBED_SECRET_FILE": str(tmp_path / "secret")}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert secret not in " ".join(cmd) and secret not in proc.stdout + proc.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_agent_ranks_without_devices_are_released(tiny_bert, tmp_path):
    raw = tiny_config(tiny_bert, rounds=1, devices={"laptop": 1}, **{"dist.profile": False})
    proc = mpirun(write_config(tmp_path, raw), tmp_path / "out", agents=2, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 2 serves no device" in proc.stderr and "not profiled" in proc.stderr


@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_inprocess_and_mpirun_agree_bitwise(tiny_bert, tmp_path, wire_dtype):
    raw = tiny_config(tiny_bert, rounds=2, devices={"laptop": 2, "jetson-tx2": 1}, **{"wire.dtype": wire_dtype})
    config = write_config(tmp_path, raw)
    proc = mpirun(config, tmp_path / "mpi", agents=2)  # 3 devices on 2 agent ranks
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(1)
    run_inprocess(from_dict(raw), tmp_path / "local", quiet=True)
    a = torch.load(tmp_path / "mpi" / "checkpoint.pt")
    b = torch.load(tmp_path / "local" / "checkpoint.pt")
    for layer in b["lora"]:
        for name in b["lora"][layer]:
            assert torch.equal(a["lora"][layer][name], b["lora"][layer][name]), (layer, name)
    for name in b["head"]:
        assert torch.equal(a["head"][name], b["head"][name])
    mpi, local = read_rows(tmp_path / "mpi"), read_rows(tmp_path / "local")
    assert [r["accuracy"] for r in mpi] == [r["accuracy"] for r in local]
    assert [r["bytes_up"] for r in mpi] == [r["bytes_up"] for r in local]


def test_causal_lm_over_mpirun_agrees_bitwise_with_in_process(tiny_decoders, tmp_path):
    """A causal LM's agents hold their layers lazily (read from the causal-LM checkpoint), send
    LoRA and no head, and score label words as the in-process run does."""
    raw = tiny_config(tiny_decoders["llama"], rounds=2, devices={"laptop": 2, "jetson-tx2": 1},
                      **{**LM, "strategy.name": "droppeft"})
    proc = mpirun(write_config(tmp_path, raw), tmp_path / "mpi", agents=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(1)
    run_inprocess(from_dict(raw), tmp_path / "local", quiet=True)
    a = torch.load(tmp_path / "mpi" / "checkpoint.pt")
    b = torch.load(tmp_path / "local" / "checkpoint.pt")
    assert b["head"] == {} and a["head"] == {}
    for layer in b["lora"]:
        for name in b["lora"][layer]:
            assert torch.equal(a["lora"][layer][name], b["lora"][layer][name]), (layer, name)
    mpi, local = read_rows(tmp_path / "mpi"), read_rows(tmp_path / "local")
    for key in ("accuracy", "test_loss", "zero_shot_accuracy", "bytes_up"):
        assert [r.get(key) for r in mpi] == [r.get(key) for r in local], key


def test_sigkilled_agent_is_left_out_and_the_run_finishes(tiny_bert, tmp_path):
    raw = tiny_config(tiny_bert, rounds=4, devices={"laptop": 3}, **{"train.local_steps": 400, "dist.deadline_s": 120})
    config = write_config(tmp_path, raw)
    out = tmp_path / "out"
    cmd = mpirun_command(str(config), [], out, 3)
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victims = wait_for("agent rank 2 started", lambda: rank_pids(2), proc)
        wait_for("round 0 done", lambda: read_rows(out), proc)
        time.sleep(0.2)  # now inside round 1 (a round takes about a second)
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4
    crash = [f for f in summary["failures"] if f["kind"] == "crash"]
    assert crash and crash[0]["device"] == "laptop-1", summary["failures"]
    r = read_rows(out)
    assert {d["device"] for d in r[-1]["devices"]} == {"laptop-0", "laptop-2"}
    # detected well before the 120 s deadline: the whole rest of the run took less
    assert time.monotonic() - killed_at < 100


def test_malformed_reply_is_rejected_and_logged(tiny_bert, tmp_path):
    """Rank 1 answers a plan with a truncated, then a tampered message; rank 0 must refuse both."""
    script = tmp_path / "rogue.py"
    script.write_text(ROGUE.format(root=str(ROOT), model=tiny_bert))
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1")), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert procs[0].returncode == 0, outs
    assert "truncated" in outs[0] and "digest" in outs[0], outs[0]
    assert "RESULT rejected rejected" in outs[0], outs[0]


def test_a_patient_receive_outlasts_the_process_group_timeout(tmp_path):
    """Agents wait for peers that are slow to join and for the slowest device of every round."""
    script = tmp_path / "late.py"
    script.write_text(LATE.format(root=str(ROOT)))
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1")), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert "RESULT late" in outs[0], outs


LATE = '''
import os, sys, time
from datetime import timedelta
sys.path.insert(0, {root!r})
import torch.distributed as dist
from testbed.comm.framing import recv_bytes, send_bytes
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2, timeout=timedelta(seconds=2))
if dist.get_rank() == 1:
    time.sleep(5)  # more than twice the process group's timeout
    send_bytes(memoryview(b"late"), 0)
    time.sleep(1)
else:
    print("RESULT", bytes(recv_bytes(1, wait_s=60)).decode(), flush=True)
os._exit(0)
'''


def test_a_rank_that_misses_its_deadline_does_not_take_the_others_down(tmp_path):
    """Rank 2 takes a plan and never answers; rank 1 goes on answering, past the process group's timeout."""
    script = tmp_path / "hung.py"
    script.write_text(HUNG.format(root=str(ROOT)))
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1")), "WORLD_SIZE": "3"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1, 2)]
    out = procs[0].communicate(timeout=120)[0]
    for p in procs[1:]:
        p.kill()
    assert "ROUND 0 ['d1'] [('d2', 'timeout')]" in out, out
    assert "ROUND 3 ['d1'] [('d2', 'lost')]" in out, out  # 4 s after the timeout, rank 1 still serves


HUNG = '''
import os, sys, time
from datetime import timedelta
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from testbed.comm.distributed import DistTransport
from testbed.comm.framing import recv_bytes, send_bytes
from testbed.comm.wire import pack, unpack, update_message
from testbed.core.plan import Job, Plan, Update
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=3, timeout=timedelta(seconds=2))
key = b"k" * 32
if dist.get_rank() == 1:
    for r in range(4):
        msg = unpack(recv_bytes(0, 60), key)
        update = Update("d1", r, {{}}, {{"w": torch.ones(2)}}, 1, {{}}, 1, 0.5)
        send_bytes(pack(update_message(update, msg.seq), key), 0)
elif dist.get_rank() == 2:
    recv_bytes(0, 60)  # takes its plan, never answers, and stays connected
    time.sleep(60)
else:
    t = DistTransport(["d1", "d2"], 2, key, torch.float32, 1.0)
    for r in range(4):
        res = t.run_round(r, {{d: Job(Plan(ranks={{}}), {{}}, {{"w": torch.zeros(2)}}) for d in ("d1", "d2")}})
        print("ROUND", r, sorted(res.updates), [(f.device, f.kind) for f in res.failures], flush=True)
        time.sleep(1.5)
os._exit(0)
'''


ROGUE = '''
import logging, os, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from testbed.comm.distributed import DistTransport
from testbed.comm.framing import recv_bytes, send_bytes
from testbed.comm.wire import pack, update_message
from testbed.core.plan import Job, Plan, Update
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
key = b"k" * 32
update = Update("d0", 0, {{}}, {{"w": torch.ones(2)}}, 1, {{}}, 1, 0.5)
if dist.get_rank() == 1:
    recv_bytes(0)
    good = pack(update_message(update, 1), key)
    send_bytes(good[: len(good) // 2], 0)       # truncated
    recv_bytes(0)
    bad = bytearray(pack(update_message(update, 2), key))
    bad[-1] ^= 0xFF                              # tampered payload
    send_bytes(bad, 0)
else:
    kinds = []
    for r in range(2):
        t = DistTransport(["d0"], 1, key, torch.float32, 30)
        res = t.run_round(0, {{"d0": Job(Plan(ranks={{}}), {{}}, {{"w": torch.zeros(2)}})}})
        kinds.append(res.failures[0].kind if res.failures else "accepted")
    print("RESULT", *kinds, flush=True)
os._exit(0)
'''


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_namespaces():
    """Two network namespaces joined by a veth pair made inside them (nothing on the host's interfaces)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    names = ("tbtest-a", "tbtest-b")
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    try:
        for ns in names:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", names[0], "link", "add", "tbva", "type", "veth", "peer", "name", "tbvb", "netns", names[1])
        for ns, dev, addr in ((names[0], "tbva", "10.78.0.1/24"), (names[1], "tbvb", "10.78.0.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
    except subprocess.CalledProcessError as exc:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    yield names
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_ranks_in_two_network_namespaces(tiny_bert, tmp_path, two_namespaces):
    ns_a, ns_b = two_namespaces
    config = write_config(tmp_path, tiny_config(tiny_bert, devices={"laptop": 2}))
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    secret.chmod(0o600)
    port = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, "-c",  # free where rank 0 listens
                           "from launch.net import free_port; print(free_port('10.78.0.1'))"],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    env = {**ENV, "WORLD_SIZE": "3", "MASTER_ADDR": "10.78.0.1", "MASTER_PORT": port,
           "TESTBED_SECRET_FILE": str(secret)}
    out = tmp_path / "out"
    procs = []
    for rank, ns, ifname in ((0, ns_a, "tbva"), (1, ns_b, "tbvb"), (2, ns_b, "tbvb")):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "launch.mpi", str(config), "--out", str(out),
               "--set", f"dist.ifname={ifname}"]
        procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(rank)}, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["failures"] == []


def test_oom_on_an_agent_is_reported_and_the_rank_keeps_serving(tiny_bert, tmp_path):
    config = write_config(tmp_path, tiny_config(tiny_bert, devices={"laptop": 1,
                                                                    "jetson-tx2": {"count": 1, "memory_mb": 1}}))
    proc = mpirun(config, tmp_path / "out", agents=1)  # one rank serves both devices
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(f["device"], f["kind"]) for f in summary["failures"]] == [("jetson-tx2-0", "oom")] * 2
    assert all([d["device"] for d in r["devices"]] == ["laptop-0"] for r in read_rows(tmp_path / "out"))


def test_pruned_agents_hold_only_their_layers_and_devices_probe_over_the_wire(tiny_llama, tmp_path):
    """One agent rank per device.  The TX2's budget holds 4 of the 16 layers and not the probe (every
    layer): its rank reads only its kept layers, its round's peak RSS is lower than the laptop's by
    most of the 12 it never held, and it is never asked to probe.  The Xavier's holds the probe but
    not the whole training plan: pruned, it probes in round 0 (every layer resident for the while,
    within its budget) and sends the probe up.  (Its peak RSS cannot show the release: its training
    fills about the same budget as the probe did; test_residency shows released layers leave RSS.)"""
    raw = tiny_config(tiny_llama, rounds=2, **{"strategy.name": "fedpruner", "strategy.cka": "device",
                                               "strategy.regroup_every": 2, "strategy.probe_rows": 8,
                                               "train.local_steps": 2, "train.batch_size": 16, "dist.profile": False})
    exp = setup(from_dict(raw))
    layers = list(range(12, 16))
    four = exp.cost.peak_memory_bytes(exp.devices["laptop-0"], Plan(ranks=dict.fromkeys(layers, 4), layers=layers,
                                                                      batch_size=16)) / 2**20
    probe = exp.cost.probe_memory_bytes(Plan(ranks=dict.fromkeys(layers, 4), layers=layers, probe_rows=8)) / 2**20
    assert four + 1 < probe  # 1 MB: less than a layer
    raw["devices"] = {"laptop": 1, "jetson-tx2": {"count": 1, "memory_mb": four + 1},
                      "xavier-nx": {"count": 1, "memory_mb": probe + 1}}
    proc = mpirun(write_config(tmp_path, raw), tmp_path / "out", agents=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layer_mb = exp.info.layer_params * 4 / 2**20
    r = read_rows(tmp_path / "out")
    rss = [{d["device"]: d["peak_rss_mb"] for d in row["devices"]} for row in r]
    up = [{d["device"]: d["bytes_up"] for d in row["devices"]} for row in r]
    kept = {d["device"]: d["layers"] for d in r[1]["devices"]}
    assert kept["laptop-0"] == 16 and kept["jetson-tx2-0"] == 4 and 4 < kept["xavier-nx-0"] < 16
    for round in (0, 1):  # the TX2 never holds more than its 4 layers: it does not probe
        assert rss[round]["laptop-0"] - rss[round]["jetson-tx2-0"] > 0.7 * 12 * layer_mb, (rss, layer_mb)
    assert abs(up[0]["jetson-tx2-0"] - up[1]["jetson-tx2-0"]) < 64 < up[0]["xavier-nx-0"] - up[1]["xavier-nx-0"]
    assert [f for row in r for f in row["failures"]] == []  # the Xavier's probe fit its budget
    probe = torch.load(tmp_path / "out" / "checkpoint.pt")["strategy"]["probe"]
    assert len(probe["cka"]) == 16 and r[0]["bytes_up"] > r[1]["bytes_up"]  # probes came up in round 0 only


def test_adaptive_plans_run_over_mpirun_as_in_process(tiny_bert, tmp_path):
    """The adaptive strategy's plans (a pruned submodel, dropout, LEGEND's frozen layers) travel
    unchanged: the same global state as in process."""
    raw = tiny_config(tiny_bert, rounds=2, **{"strategy.name": "adaptive", "strategy.drops": [0.5],
                                              "strategy.drop_on": "all", "strategy.factors": [1.0, 0.9],
                                              "devices": {"laptop": 1, "jetson-tx2": 1}})
    exp = setup(from_dict(raw))
    tx2 = exp.devices["jetson-tx2-0"]
    whole = min(exp.cost.peak_memory_bytes(tx2, c) for c in candidates(make_strategy(exp).ctx))
    raw["devices"]["jetson-tx2"] = {"count": 1, "memory_mb": (whole - 2**14) / 2**20}  # too little for both layers
    proc = mpirun(write_config(tmp_path, raw), tmp_path / "mpi", agents=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(1)
    run_inprocess(from_dict(raw), tmp_path / "local", quiet=True)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("mpi", "local"))
    assert all(torch.equal(a["lora"][l][n], b["lora"][l][n]) for l in b["lora"] for n in b["lora"][l])
    assert all(torch.equal(a["head"][n], b["head"][n]) for n in b["head"])
    mpi, local = read_rows(tmp_path / "mpi"), read_rows(tmp_path / "local")
    for r in mpi:
        device = {d["device"]: d for d in r["devices"]}
        assert device["jetson-tx2-0"]["layers"] == 1 and device["laptop-0"]["layers"] == 2
        assert all(d["drop"] == 0.5 for d in r["devices"])
    assert [r["accuracy"] for r in mpi] == [r["accuracy"] for r in local]
