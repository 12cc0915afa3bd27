"""The emulated lab, built for real: namespaces, veth links, sshd, cgroups, tbf (root, cgroup v1)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from launch import lab
from testbed.cli import main
from testbed.core.errors import TestbedError
from tests.helpers import NO_LAB, ROOT, lab_test, leftovers

# A subnet and names of this test run's own, so that another lab on the machine does not clash.
SUBNET, SUBNET_C, SUBNET_F = (f"10.{n}.{os.getpid() % 250 + 1}" for n in (213, 214, 215))
NAME = f"t{os.getpid() % 100000}"
# Pure Python, about 0.1-0.3 s of one CPU: it prints the wall and CPU seconds its loop took.
CPU_LOOP = ("import time; t, c = time.perf_counter(), time.process_time(); sum(i * i for i in range(4_000_000)); "
            "print(time.perf_counter() - t, time.process_time() - c)")


def inventory(path: Path, hosts: str, subnet: str = SUBNET) -> Path:
    path.write_text(f"""
all:
  vars:
    testbed_lab_subnet: {subnet}.0/24
    ansible_user: root
    testbed_memory_mb: 512
    testbed_bandwidth_mbit: 100
    ansible_ssh_private_key_file: "{{{{ inventory_dir }}}}/keys/id_ed25519"
  hosts:
{hosts}""")
    return path


TWO_HOSTS = f"""    quarter: {{ansible_host: {SUBNET}.10, testbed_cpu: 0.25, testbed_bandwidth_mbit: 20}}
    whole: {{ansible_host: {SUBNET}.11, ansible_port: 2222, testbed_cpu: 1.0, testbed_memory_mb: 768}}
"""


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    if NO_LAB:
        pytest.skip(NO_LAB)
    d = tmp_path_factory.mktemp("lab")
    state = lab.up(lab.lab_spec(inventory(d / "two.yaml", TWO_HOSTS), NAME, str(d / "lab")))
    yield state
    lab.down(state)
    assert leftovers(state, list(state.pids.values())) == []


def remote(state: lab.LabState, host: str, command: str) -> str:
    rc, out, err = lab.run_on(state, host, command)
    assert rc == 0, err
    return out


@lab_test
@pytest.mark.parametrize("host", ["quarter", "whole"])
def test_each_host_answers_over_ssh_in_its_own_namespace_and_cgroups(two_hosts, host):
    h = two_hosts.host(host)
    out = remote(two_hosts, host, "hostname; readlink /proc/self/ns/net; cat /proc/self/cgroup").splitlines()
    assert out[0] == host
    assert out[1] == f"net:[{os.stat(f'/run/netns/{h.netns}').st_ino}]"
    cgroups = dict(line.split(":")[1:] for line in out[2:])  # "4:memory:/path" -> {"memory": "/path"}
    assert cgroups["cpu"] == cgroups["memory"] == f"/{h.netns}"


@lab_test
def test_only_the_lab_key_logs_in_and_only_known_host_keys_are_accepted(two_hosts, tmp_path):
    h = two_hosts.host("whole")
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    client = paramiko.SSHClient()
    client.load_host_keys(two_hosts.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(h.address, h.port, username="root", key_filename=str(stranger), look_for_keys=False,
                       allow_agent=False, timeout=10)
    client.close()
    other = paramiko.SSHClient()  # the right key, but this host's key is not known: refused
    other.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        other.connect(h.address, h.port, username="root", key_filename=two_hosts.key_file, look_for_keys=False,
                      allow_agent=False, timeout=10)
    other.close()


@lab_test
def test_cgroups_hold_the_quota_and_the_memory_limit(two_hosts):
    for name, cpus, mb in (("quarter", 0.25, 512), ("whole", 1.0, 768)):
        cpu, memory = lab.cgroup_dirs(two_hosts.host(name))
        period = int((cpu / "cpu.cfs_period_us").read_text())
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == cpus * period
        assert int((memory / "memory.limit_in_bytes").read_text()) == mb * 2**20
        if (memory / "memory.memsw.limit_in_bytes").exists():
            assert int((memory / "memory.memsw.limit_in_bytes").read_text()) == mb * 2**20


@lab_test
def test_the_memory_limit_is_enforced(two_hosts):
    """512 MB on `quarter`: 200 MB fit, 700 MB written are killed by the cgroup's OOM killer."""
    fill = f"{sys.executable} -c 'b = bytes(1) * ({{}} * 2**20); print(len(b))'"
    assert lab.run_on(two_hosts, "quarter", fill.format(200))[0] == 0
    rc, _, _ = lab.run_on(two_hosts, "quarter", fill.format(700))
    memory = lab.cgroup_dirs(two_hosts.host("quarter"))[1]
    assert rc != 0 and "oom_kill 1" in (memory / "memory.oom_control").read_text()


@lab_test
def test_tbf_limits_both_ends_of_each_link(two_hosts):
    for name, mbit in (("quarter", 20), ("whole", 100)):
        h = two_hosts.host(name)
        for netns, dev in ((h.netns, "tb0"), (f"tb-{NAME}", h.veth)):
            out = subprocess.run(["tc", "-n", netns, "-j", "qdisc", "show", "dev", dev], capture_output=True,
                                 text=True, check=True).stdout
            (qdisc,) = json.loads(out)
            assert qdisc["kind"] == "tbf" and qdisc["options"]["rate"] * 8 == mbit * 1_000_000


@lab_test
def test_hosts_reach_each_other_and_nothing_outside_the_lab(two_hosts):
    whole = two_hosts.host("whole")
    banner = (f"{sys.executable} -c 'import socket; s = socket.create_connection((\"{whole.address}\", "
              f"{whole.port}), 5); print(s.recv(4).decode())'")
    assert remote(two_hosts, "quarter", banner).strip() == "SSH-"
    # a route lookup only: nothing is sent
    rc, _, err = lab.run_on(two_hosts, "quarter", "ip route get 192.0.2.1")
    assert rc != 0 and "unreachable" in err


def cpu_loop(state: lab.LabState, host: str) -> tuple[float, float, int]:
    """Wall and CPU seconds of CPU_LOOP on the host, and how often the kernel throttled it meanwhile."""
    stat = lab.cgroup_dirs(state.host(host))[0] / "cpu.stat"
    before = int(stat.read_text().split("nr_throttled ")[1].split()[0])
    wall, cpu = map(float, remote(state, host, f"{sys.executable} -c '{CPU_LOOP}'").split())
    return wall, cpu, int(stat.read_text().split("nr_throttled ")[1].split()[0]) - before


@lab_test
def test_the_quota_caps_the_cpu_a_host_gets(two_hosts):
    """Whatever else runs on this machine, a quarter host never gets more than a quarter of a CPU."""
    wall, cpu, throttled = cpu_loop(two_hosts, "quarter")
    assert cpu / wall < 0.3 and throttled > 0, (wall, cpu, throttled)


@lab_test
def test_a_quarter_cpu_host_is_clearly_slower_than_a_whole_cpu_host(two_hosts):
    """The same loop on each, in turns, best of three.  On a busy machine both slow down alike:
    each host's weight against other processes follows its CPUs, as its quota does."""
    runs = {"whole": [], "quarter": []}
    for _ in range(3):
        for host in runs:
            runs[host].append(cpu_loop(two_hosts, host)[0])
    quarter, whole = min(runs["quarter"]), min(runs["whole"])
    print(f"loop: {quarter:.3f} s at 0.25 CPU, {whole:.3f} s at 1 CPU: ratio {quarter / whole:.2f}")
    assert quarter / whole > 2, runs


@lab_test
def test_up_refuses_a_lab_that_is_up(two_hosts):
    with pytest.raises(TestbedError, match="already up"):
        lab.up(lab.lab_spec(Path(two_hosts.dir).parent / "two.yaml", NAME, two_hosts.dir))


@lab_test
def test_cli_up_status_and_down_after_a_crash_leave_nothing(tmp_path, capsys):
    inv = inventory(tmp_path / "one.yaml", f"    solo: {{ansible_host: {SUBNET_C}.20, testbed_cpu: 0.5}}\n",
                    subnet=SUBNET_C)
    where = ["--name", f"{NAME}c", "--dir", str(tmp_path / "lab")]
    assert main(["lab", "up", "-i", str(inv), *where]) == 0
    state = lab.load_state(tmp_path / "lab")
    assert "solo" in capsys.readouterr().out
    # a session leaves a process behind, then sshd dies as in a crash
    rc, out, _ = lab.run_on(state, "solo", "setsid sleep 300 > /dev/null 2>&1 < /dev/null & echo $!")
    pids = [state.pids["solo"], int(out)]
    os.kill(state.pids["solo"], 9)
    assert main(["lab", "status", *where]) == 0
    assert f"{state.pids['solo']} down" in capsys.readouterr().out
    assert main(["lab", "down", *where]) == 0
    assert re.search(r"down: ended [1-9]\d* processes, removed 2 namespaces, 2 cgroups", capsys.readouterr().err)
    assert leftovers(state, pids) == []
    assert main(["lab", "down", *where]) == 0  # twice is harmless
    assert "no lab in" in capsys.readouterr().err


@lab_test
def test_a_failed_up_rolls_back(tmp_path, monkeypatch):
    inv = inventory(tmp_path / "one.yaml", f"    solo: {{ansible_host: {SUBNET_F}.30, testbed_cpu: 0.5}}\n",
                    subnet=SUBNET_F)
    spec = lab.lab_spec(inv, f"{NAME}f", str(tmp_path / "lab"))

    def fails(*_):  # the last step of up fails, after every namespace, cgroup and sshd exists
        raise TestbedError("injected failure")

    monkeypatch.setattr(lab, "write_known_hosts", fails)
    with pytest.raises(TestbedError, match="injected"):
        lab.up(spec)
    state = lab.LabState(spec.name, str(spec.dir), spec.address, spec.uplink, str(spec.key_file),
                         str(spec.known_hosts), spec.hosts, [spec.netns, spec.hosts[0].netns], [spec.uplink])
    assert leftovers(state, []) == [] and not (tmp_path / "keys").exists()


@lab_test
def test_down_cleans_up_after_up_itself_crashed(tmp_path):
    inv = inventory(tmp_path / "one.yaml", f"    solo: {{ansible_host: {SUBNET_F}.40, testbed_cpu: 0.5}}\n",
                    subnet=SUBNET_F)
    # `lab up` dies without a chance to roll back, after everything but known_hosts exists
    crash = ("import os, sys; from launch import lab; lab.write_known_hosts = lambda *_: os._exit(3); "
             "lab.up(lab.lab_spec(*sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", crash, str(inv), f"{NAME}k", str(tmp_path / "lab")], cwd=ROOT)
    assert proc.returncode == 3
    state = lab.load_state(tmp_path / "lab")
    assert state.netns[-1] in lab.namespaces() and lab.alive(state.pids["solo"])
    assert main(["lab", "down", "--dir", str(tmp_path / "lab")]) == 0
    assert leftovers(state, list(state.pids.values())) == []


@lab_test
def test_a_missing_tool_is_named_with_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(lab, "SBIN", str(tmp_path))
    with pytest.raises(TestbedError, match=r"^ip not found: install Debian's iproute2"):
        lab.check_machine("up")


def test_lab_up_without_root_says_so_in_one_line():
    # a user namespace without a mapping: a process without root's powers on this machine
    cmd = [sys.executable, "-m", "testbed.cli", "lab", "up", "-i", "inventory/lab-emulated.yaml"]
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("needs unshare (util-linux) to drop root")
        cmd = ["unshare", "--user", *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (2, "testbed: error: lab up needs root (network namespaces and cgroups)\n")


def test_the_shipped_lab_inventory_describes_four_hosts_in_the_project():
    spec = lab.lab_spec(ROOT / "inventory" / "lab-emulated.yaml", directory=str(ROOT / ".lab" / "lab-emulated"))
    assert spec.key_file == ROOT / ".lab" / "lab-emulated" / "id_ed25519"
    assert spec.known_hosts == ROOT / ".lab" / "lab-emulated" / "known_hosts"
    assert {h.name: h.cpu for h in spec.hosts} == {"aggregator": 1.0, "laptop-01": 1.0, "orin-nano-01": 0.5,
                                                  "tx2-01": 0.25}
    assert len({h.address for h in spec.hosts}) == 4 and spec.address == "10.77.0.1/24"


BAD = {
    "no cpu": ("    h: {ansible_host: 10.9.0.5}\n", "host h: testbed_cpu is not set"),
    "cpu zero": ("    h: {ansible_host: 10.9.0.5, testbed_cpu: 0}\n", "host h: testbed_cpu 0 must be between 0.1 and"),
    "cpu text": ("    h: {ansible_host: 10.9.0.5, testbed_cpu: fast}\n", "host h: testbed_cpu must be a number"),
    "too many cpus": ("    h: {ansible_host: 10.9.0.5, testbed_cpu: 999}\n", "host h: testbed_cpu 999 must be"),
    "a name": ("    h: {ansible_host: lab-h, testbed_cpu: 1}\n", "host h: ansible_host 'lab-h' is not an IPv4"),
    "outside": ("    h: {ansible_host: 10.8.0.5, testbed_cpu: 1}\n", "host h: ansible_host 10.8.0.5 must be in"),
    "this machine's": ("    h: {ansible_host: 10.9.0.1, testbed_cpu: 1}\n", "host h: ansible_host 10.9.0.1 must"),
    "same address": ("    h: {ansible_host: 10.9.0.5, testbed_cpu: 1}\n    g: {ansible_host: 10.9.0.5, testbed_cpu: 1}\n",
                     "host g: ansible_host 10.9.0.5 is also h's"),
    "little memory": ("    h: {ansible_host: 10.9.0.5, testbed_cpu: 1, testbed_memory_mb: 10}\n",
                      "host h: testbed_memory_mb 10: a lab host needs at least 64"),
    "bandwidth": ("    h: {ansible_host: 10.9.0.5, testbed_cpu: 1, testbed_bandwidth_mbit: -3}\n",
                  "host h: testbed_bandwidth_mbit -3 must be between"),
    "user": ("    h: {ansible_host: 10.9.0.5, testbed_cpu: 1, ansible_user: no-such-user}\n",
             "host h: ansible_user 'no-such-user' is not a user"),
    "two subnets": ("    h: {ansible_host: 10.9.0.5, testbed_cpu: 1, testbed_lab_subnet: 10.10.0.0/24}\n"
                    "    g: {ansible_host: 10.9.0.6, testbed_cpu: 1}\n", "testbed_lab_subnet differs between hosts"),
    "bad subnet": ("    h: {ansible_host: 10.9.0.5, testbed_cpu: 1, testbed_lab_subnet: 10.9.0.1/33}\n",
                   "testbed_lab_subnet '10.9.0.1/33' is not an IPv4 network"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_lab_variables_are_named_with_file_and_host(tmp_path, case):
    hosts, message = BAD[case]
    inv = inventory(tmp_path / "bad.yaml", hosts, subnet="10.9.0")
    with pytest.raises(TestbedError) as err:
        lab.lab_spec(inv)
    assert str(err.value).startswith(str(inv)) and message in str(err.value)


def test_a_lab_name_must_fit_an_interface_name(tmp_path):
    inv = inventory(tmp_path / "a-much-too-long-name.yaml", "    h: {ansible_host: 10.9.0.5, testbed_cpu: 1}\n",
                    subnet="10.9.0")
    with pytest.raises(TestbedError, match="at most 12 of a-z"):
        lab.lab_spec(inv)


def test_a_lab_needs_a_subnet(tmp_path):
    inv = tmp_path / "nosubnet.yaml"
    inv.write_text("all:\n  hosts:\n    h: {ansible_host: 10.9.0.5, testbed_cpu: 1}\n")
    with pytest.raises(TestbedError, match=r"nosubnet.yaml: testbed_lab_subnet is not set"):
        lab.lab_spec(inv)
