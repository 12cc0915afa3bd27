"""The emulated lab: every host of an inventory becomes a small machine on this one.

`testbed lab up -i INV` gives each host
  - a network namespace `tb-LAB-HOST` whose interface `tb0` holds the host's `ansible_host`,
    linked by a veth pair (`tb-hN` on the other end) to the bridge `tb-br` in the lab's own
    namespace `tb-LAB`;
  - through one more veth pair from that bridge, a path from this machine: the interface
    `tb-LAB` in the root namespace holds the first address of `testbed_lab_subnet`.  The hosts
    have no route beyond the subnet and nothing is forwarded, so they reach nothing else;
  - an sshd in its namespace (and UTS namespace: `hostname` is the host's name), with its own
    config and host key, key-only, that accepts the lab's client key; known_hosts lists every host's key, so clients verify them;
  - cgroups `/sys/fs/cgroup/{cpu,memory}/tb-LAB-HOST` with the CPU quota `testbed_cpu` (in
    CPUs; also its weight against other processes) and the memory limit `testbed_memory_mb`;
    the sshd joins them before it starts, so every SSH session and whatever it starts inherits
    them;
  - a tbf limit of `testbed_bandwidth_mbit` on both ends of its link (each direction).

Everything `lab up` makes is listed in the lab directory's `state.json` *before* it is made,
so `lab down` removes exactly that, after a crash or a failed `up` too, and twice is harmless.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from launch.inventory import Host, load_inventory
from testbed.core.devices import CLASSES
from testbed.core.errors import TestbedError

CGROUPS = Path("/sys/fs/cgroup")
# The CFS period.  Short, so that a host with a quarter of a CPU is slow evenly at the scale of
# one transformer layer (milliseconds), rather than at full speed for 25 ms and then stopped
# for 75 ms, as under the kernel's default 100 ms; the kernel's smallest quota is 1 ms.
PERIOD_US = 10_000
MIN_CPU = 1_000 / PERIOD_US
TOOLS = {"ip": "iproute2", "tc": "iproute2", "sshd": "openssh-server", "ssh-keygen": "openssh-client",
         "nsenter": "util-linux"}
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"  # where sshd and ip live, often outside a user's PATH
LAB_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,11}")  # `tb-NAME` names an interface: 15 characters at most
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
STATE = "state.json"
MIN_MEMORY_MB = 64  # sshd and a shell


@dataclass
class LabHost:
    name: str
    address: str
    port: int
    user: str
    cpu: float  # CPUs: the cgroup's CFS quota over its period
    memory_mb: float  # the cgroup's memory limit
    bandwidth_mbit: float  # tbf rate, each direction
    netns: str
    veth: str  # the bridge's end of the host's link (the host's own end is tb0)


@dataclass
class LabSpec:
    """A lab as an inventory describes it, before anything is made."""

    name: str
    dir: Path
    subnet: ipaddress.IPv4Network
    key_file: Path
    known_hosts: Path
    hosts: list[LabHost]

    @property
    def netns(self) -> str:
        return f"tb-{self.name}"

    @property
    def uplink(self) -> str:
        """This machine's end of the link to the lab bridge (root namespace)."""
        return f"tb-{self.name}"

    @property
    def address(self) -> str:
        return f"{self.subnet[1]}/{self.subnet.prefixlen}"


@dataclass
class LabState:
    """What `lab up` made; each item is saved before it is made."""

    name: str
    dir: str
    address: str  # this machine's address on the lab network, with its prefix
    uplink: str
    key_file: str
    known_hosts: str
    hosts: list[LabHost]
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # in the root namespace
    cgroups: list[str] = field(default_factory=list)  # directories
    paths: list[str] = field(default_factory=list)  # files and directories made outside `dir`
    pids: dict[str, int] = field(default_factory=dict)  # each host's sshd

    def record(self, kind: str, item: str) -> None:
        getattr(self, kind).append(item)
        self.save()

    def save(self) -> None:
        path = Path(self.dir) / STATE
        path.with_suffix(".tmp").write_text(json.dumps(dataclasses.asdict(self), indent=1))
        path.with_suffix(".tmp").replace(path)

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise TestbedError(f"lab {self.name} has no host {name!r}")


# --- the lab an inventory describes -------------------------------------------------------

def lab_dir(name: str, directory: str | None = None) -> Path:
    return as_path(directory or str(Path(".lab") / name))


def lab_spec(inventory: str | Path, name: str | None = None, directory: str | None = None) -> LabSpec:
    where = str(inventory)
    hosts = load_inventory(inventory)
    name = name or Path(inventory).stem
    if not LAB_NAME.fullmatch(name):
        raise TestbedError(f"lab name {name!r}: at most 12 of a-z, 0-9 and '-' (it names an interface); "
                           f"give --name")
    subnet_text = common_var(hosts, "testbed_lab_subnet", where)
    if not subnet_text:
        raise TestbedError(f"{where}: testbed_lab_subnet is not set (the lab network, e.g. 10.77.0.0/24)")
    try:
        subnet = ipaddress.IPv4Network(subnet_text)
    except ValueError:
        raise TestbedError(f"{where}: testbed_lab_subnet {subnet_text!r} is not an IPv4 network such as "
                           f"10.77.0.0/24") from None
    if subnet.num_addresses < 4:
        raise TestbedError(f"{where}: testbed_lab_subnet {subnet} is too small for a lab")
    root = lab_dir(name, directory)
    key = common_var(hosts, "ansible_ssh_private_key_file", where)
    known = common_var(hosts, "testbed_known_hosts", where)
    spec = LabSpec(name, root, subnet, as_path(key) if key else root / "id_ed25519",
                   as_path(known) if known else root / "known_hosts",
                   [lab_host(h, i, name, subnet, where) for i, h in enumerate(hosts)])
    seen: dict[str, str] = {}
    for h in spec.hosts:
        if h.address in seen:
            raise TestbedError(f"{where}: host {h.name}: ansible_host {h.address} is also {seen[h.address]}'s")
        seen[h.address] = h.name
    return spec


def lab_inventory(path: Path, subnet: str, hosts: dict[str, dict]) -> Path:
    """Write an inventory for a lab made in code: `hosts` (name: vars) on `subnet` (its first
    three octets, e.g. "10.216.3"), the lab's keys and the hosts' workdirs beside the file, and
    this machine's Python on the hosts (they share its file system)."""
    path.write_text(yaml.safe_dump({"all": {"vars": {
        "testbed_lab_subnet": f"{subnet}.0/24", "ansible_user": "root",
        "ansible_ssh_private_key_file": "{{ inventory_dir }}/keys/id_ed25519",
        "testbed_known_hosts": "{{ inventory_dir }}/keys/known_hosts",
        "ansible_python_interpreter": sys.executable,
        "testbed_workdir": "{{ inventory_dir }}/work",
        "testbed_memory_mb": 1536, "testbed_bandwidth_mbit": 200}, "hosts": hosts}}))
    return path


def common_var(hosts: list[Host], var: str, where: str) -> str:
    values = {str(h.vars.get(var, "")) for h in hosts}
    if len(values) > 1:
        raise TestbedError(f"{where}: {var} differs between hosts; a lab has one (set it under all: vars)")
    return values.pop()


def as_path(text: str) -> Path:
    return Path(os.path.normpath(Path(text).expanduser().absolute()))


def lab_host(h: Host, index: int, lab: str, subnet: ipaddress.IPv4Network, where: str) -> LabHost:
    at = f"{where}: host {h.name}"
    if not HOST_NAME.fullmatch(h.name):
        raise TestbedError(f"{at}: a lab host's name is letters, digits, '_', '.' and '-'")
    try:
        address = ipaddress.IPv4Address(h.address)
    except ValueError:
        raise TestbedError(f"{at}: ansible_host {h.address!r} is not an IPv4 address "
                           f"(a lab host needs one in testbed_lab_subnet {subnet})") from None
    if address not in subnet or address in (subnet.network_address, subnet.broadcast_address, subnet[1]):
        raise TestbedError(f"{at}: ansible_host {address} must be in testbed_lab_subnet {subnet}, and neither "
                           f"its first ({subnet[1]}: this machine's) nor its network or broadcast address")
    cls = CLASSES.get(h.profile)
    cpu = lab_number(h.vars, "testbed_cpu", at, None, MIN_CPU, os.cpu_count() or 1)
    memory = h.memory_mb or (cls.memory_mb if cls else 0)
    if memory < MIN_MEMORY_MB:
        raise TestbedError(f"{at}: testbed_memory_mb {memory:g}: a lab host needs at least {MIN_MEMORY_MB} "
                           f"(give testbed_memory_mb, or a testbed_profile whose budget it takes)")
    bandwidth = lab_number(h.vars, "testbed_bandwidth_mbit", at, cls.bandwidth_mbit if cls else None, 0.01, 100_000)
    user = h.user or "root"
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise TestbedError(f"{at}: ansible_user {user!r} is not a user of this machine "
                           f"(lab hosts share its users)") from None
    return LabHost(h.name, str(address), h.port, user, cpu, memory, bandwidth, f"tb-{lab}-{h.name}", f"tb-h{index}")


def lab_number(v: dict[str, Any], key: str, at: str, default: float | None, least: float, most: float) -> float:
    value = v.get(key, default)
    if value is None:
        raise TestbedError(f"{at}: {key} is not set (a lab host needs it)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TestbedError(f"{at}: {key} must be a number, got {value!r}")
    if not least <= value <= most:
        raise TestbedError(f"{at}: {key} {value:g} must be between {least:g} and {most:g}")
    return float(value)


# --- this machine ----------------------------------------------------------------------------

def which(tool: str, path: str | None = None) -> str | None:
    return shutil.which(tool, path=path if path is not None else f"{os.environ.get('PATH', '')}:{SBIN}")


def missing_tool(path: str | None = None) -> str | None:
    return next((t for t in TOOLS if not which(t, path)), None)


def check_machine(verb: str) -> None:
    if os.geteuid() != 0:
        raise TestbedError(f"lab {verb} needs root (network namespaces and cgroups)")
    if tool := missing_tool():
        raise TestbedError(f"{tool} not found: install Debian's {TOOLS[tool]} (apt-get install {TOOLS[tool]})")
    for controller, probe in (("cpu", "cpu.cfs_quota_us"), ("memory", "memory.limit_in_bytes")):
        if not (CGROUPS / controller / probe).exists():
            raise TestbedError(f"{CGROUPS / controller / probe} not found: the lab needs cgroup v1's "
                               f"{controller} controller")


def unavailable() -> str:
    """Why this machine cannot build a lab ("" if it can): for tests and benchmarks that skip."""
    try:
        check_machine("up")
    except TestbedError as exc:
        return str(exc)
    return ""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True, timeout=60)
    if check and proc.returncode:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise TestbedError(f"`{' '.join(cmd)}` failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc


def ip(netns: str, *args: str) -> None:
    sh("ip", "-n", netns, *args)


def namespaces() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()}


def link_exists(name: str) -> bool:
    return sh("ip", "link", "show", "dev", name, check=False).returncode == 0


def cgroup_dirs(host: LabHost) -> tuple[Path, Path]:
    """The host's cpu and memory cgroups, named as its namespace.

    At the top of each hierarchy, not under a common parent: a parent would make all of a lab's
    hosts weigh as one process against the machine's others."""
    return CGROUPS / "cpu" / host.netns, CGROUPS / "memory" / host.netns


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def wait_for(check: Callable[[], Any], seconds: float, failure: str) -> Any:
    deadline = time.monotonic() + seconds
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TestbedError(failure)
        time.sleep(0.05)
    return result


# --- up -------------------------------------------------------------------------------------

def up(spec: LabSpec) -> LabState:
    check_machine("up")
    check_free(spec)
    made = make_dirs(spec.dir)
    state = LabState(spec.name, str(spec.dir), spec.address, spec.uplink, str(spec.key_file),
                     str(spec.known_hosts), spec.hosts, paths=[str(p) for p in made if p != spec.dir])
    state.save()
    try:
        make_client_key(spec, state)
        make_bridge(spec, state)
        for host in spec.hosts:
            link_host(spec, host, state)
            start_sshd(spec, host, state, limit_host(spec, host, state))
        write_known_hosts(spec, state)
    except BaseException:
        down(state)  # roll back whatever was made
        raise
    return state


def check_free(spec: LabSpec) -> None:
    if (spec.dir / STATE).exists():
        raise TestbedError(f"lab {spec.name} is already up in {spec.dir}: `testbed lab down` it first")
    if spec.dir.exists() and any(spec.dir.iterdir()):
        raise TestbedError(f"{spec.dir} exists and is not empty: give the lab another --dir")
    if spec.known_hosts.exists():
        raise TestbedError(f"{spec.known_hosts} exists: lab up writes its own known_hosts there "
                           f"(point testbed_known_hosts at a new file)")
    taken = namespaces()
    for ns in [spec.netns] + [h.netns for h in spec.hosts]:
        if ns in taken:
            raise TestbedError(f"network namespace {ns} exists (left by a lab whose state is lost? "
                               f"`ip netns del {ns}`)")
    if link_exists(spec.uplink):
        raise TestbedError(f"interface {spec.uplink} exists: another lab named {spec.name}? give --name")
    for route in json.loads(sh("ip", "-j", "-4", "route", "show").stdout or "[]"):
        dst = route.get("dst", "default")
        if dst != "default" and ipaddress.ip_network(dst, strict=False).overlaps(spec.subnet):
            raise TestbedError(f"testbed_lab_subnet {spec.subnet} overlaps {dst} on {route.get('dev')}: "
                               f"choose another subnet")
    for d in (d for h in spec.hosts for d in cgroup_dirs(h)):
        if d.exists():
            raise TestbedError(f"cgroup {d} exists (left by a lab whose state is lost? rmdir it)")


def make_dirs(path: Path) -> list[Path]:
    """mkdir -p; returns the directories it made, outermost first."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for p in reversed(missing):
        p.mkdir()
    return missing[::-1]


def outside(state: LabState, path: Path) -> bool:
    return not path.is_relative_to(state.dir)


def record_outside(state: LabState, path: Path) -> None:
    """Record a file about to be made outside the lab directory, and any directory it needs."""
    if outside(state, path):
        for d in make_dirs(path.parent):
            state.record("paths", str(d))
        state.record("paths", str(path))


def make_client_key(spec: LabSpec, state: LabState) -> None:
    """The key every host accepts; a key the inventory names and that exists already is used as is."""
    key = spec.key_file
    if not key.exists():
        record_outside(state, key)
        record_outside(state, key.with_name(key.name + ".pub"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"testbed-lab-{spec.name}", "-f", str(key))
    public = sh("ssh-keygen", "-y", "-f", str(key)).stdout
    (spec.dir / "authorized_keys").write_text(public)


def make_bridge(spec: LabSpec, state: LabState) -> None:
    state.record("netns", spec.netns)
    sh("ip", "netns", "add", spec.netns)
    ip(spec.netns, "link", "set", "lo", "up")
    ip(spec.netns, "link", "add", "tb-br", "type", "bridge")
    ip(spec.netns, "link", "set", "tb-br", "up")
    state.record("links", spec.uplink)
    # made inside the lab namespace; only its far end moves out, to this process's namespace
    ip(spec.netns, "link", "add", "tb-up", "type", "veth", "peer", "name", spec.uplink, "netns", str(os.getpid()))
    ip(spec.netns, "link", "set", "tb-up", "master", "tb-br", "up")
    sh("ip", "addr", "add", spec.address, "dev", spec.uplink)
    sh("ip", "link", "set", spec.uplink, "up")


def link_host(spec: LabSpec, host: LabHost, state: LabState) -> None:
    state.record("netns", host.netns)
    sh("ip", "netns", "add", host.netns)
    ip(host.netns, "link", "set", "lo", "up")
    ip(spec.netns, "link", "add", host.veth, "type", "veth", "peer", "name", "tb0", "netns", host.netns)
    ip(spec.netns, "link", "set", host.veth, "master", "tb-br", "up")
    ip(host.netns, "addr", "add", f"{host.address}/{spec.subnet.prefixlen}", "dev", "tb0")
    ip(host.netns, "link", "set", "tb0", "up")
    for netns, dev in ((host.netns, "tb0"), (spec.netns, host.veth)):  # out of the host, and into it
        sh("tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", *tbf_options(host.bandwidth_mbit))


def tbf_options(mbit: float) -> list[str]:
    rate = mbit * 1e6 / 8  # bytes per second
    burst = max(int(rate / 100), 32 * 1024)  # 10 ms at the rate, and room for a few full packets
    return ["rate", f"{round(mbit * 1000)}kbit", "burst", str(burst), "latency", "50ms"]


def limit_host(spec: LabSpec, host: LabHost, state: LabState) -> tuple[Path, Path]:
    cpu, memory = cgroup_dirs(host)
    for d in (cpu, memory):
        state.record("cgroups", str(d))
        d.mkdir()
    (cpu / "cpu.shares").write_text(str(max(2, round(1024 * host.cpu))))  # 1024: one ordinary process
    (cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (cpu / "cpu.cfs_quota_us").write_text(str(round(host.cpu * PERIOD_US)))
    limit = str(int(host.memory_mb * 2**20))
    (memory / "memory.limit_in_bytes").write_text(limit)
    if (memory / "memory.memsw.limit_in_bytes").exists():  # so that swap cannot lift the limit
        (memory / "memory.memsw.limit_in_bytes").write_text(limit)
    return cpu, memory


def join_cgroups(dirs: tuple[Path, ...]) -> None:
    for d in dirs:
        (d / "cgroup.procs").write_text(str(os.getpid()))


def sshd_config(spec: LabSpec, host: LabHost, here: Path) -> str:
    return "\n".join([
        f"# testbed lab {spec.name}: host {host.name}",
        f"ListenAddress {host.address}:{host.port}",
        f'HostKey "{here / "ssh_host_ed25519_key"}"',
        f'PidFile "{here / "sshd.pid"}"',
        f'AuthorizedKeysFile "{spec.dir / "authorized_keys"}"',
        f"AllowUsers {host.user}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",  # PAM would move sessions to other cgroups
        "StrictModes no",  # the lab's files may live in group-writable places such as /tmp
        "UseDNS no",
        "PrintMotd no",
        "Subsystem sftp internal-sftp",
    ]) + "\n"


def start_sshd(spec: LabSpec, host: LabHost, state: LabState, cgroups: tuple[Path, Path]) -> None:
    here = spec.dir / "hosts" / host.name
    here.mkdir(parents=True)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(here / "ssh_host_ed25519_key"))
    (here / "sshd_config").write_text(sshd_config(spec, host, here))
    log = here / "sshd.log"
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation directory
    # In the host's namespace, with a hostname of its own (a UTS namespace); sshd joins the
    # host's cgroups before it execs, so nothing of it ever runs outside them.  nsenter, not
    # `ip netns exec`, which mounts a fresh /sys without /sys/fs/cgroup: agents read their
    # memory limit there.
    cmd = [which("nsenter"), f"--net=/run/netns/{host.netns}", "unshare", "--uts", "sh", "-c",
           'hostname "$0" && exec "$@"', host.name, which("sshd"), "-f", str(here / "sshd_config"), "-E", str(log)]
    proc = subprocess.run(cmd, preexec_fn=lambda: join_cgroups(cgroups), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)
    if proc.returncode:
        lines = (proc.stderr + (log.read_text() if log.exists() else "")).strip().splitlines()
        raise TestbedError(f"host {host.name}: sshd did not start: {lines[-1] if lines else proc.returncode}")
    pid = wait_for(lambda: read_pid(here / "sshd.pid"), 5, f"host {host.name}: sshd wrote no pid file ({log})")
    state.pids[host.name] = pid
    state.save()
    wait_for(lambda: answers(host), 5, f"host {host.name}: sshd does not answer at {host.address}:{host.port}")


def read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def answers(host: LabHost) -> bool:
    """An SSH banner from the host, over the lab network from this machine."""
    try:
        with socket.create_connection((host.address, host.port), timeout=1) as s:
            return s.recv(4) == b"SSH-"
    except OSError:
        return False


def write_known_hosts(spec: LabSpec, state: LabState) -> None:
    lines = []
    for host in spec.hosts:
        kind, blob = (spec.dir / "hosts" / host.name / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        pattern = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
        lines.append(f"{pattern} {kind} {blob}\n")
    record_outside(state, spec.known_hosts)
    spec.known_hosts.write_text("".join(lines))


# --- down -----------------------------------------------------------------------------------

def load_state(directory: Path) -> LabState | None:
    path = directory / STATE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        raw["hosts"] = [LabHost(**h) for h in raw["hosts"]]
        return LabState(**raw)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise TestbedError(f"{path}: not a lab state file: {exc}") from None


@dataclass
class Teardown:
    processes: int = 0
    namespaces: int = 0
    cgroups: int = 0


def down(state: LabState) -> Teardown:
    done = Teardown(processes=end_processes(state))
    present = namespaces()
    for ns in reversed(state.netns):  # the hosts' first, then the lab's (and with it the uplink)
        if ns in present:
            sh("ip", "netns", "del", ns)
            done.namespaces += 1
    for link in state.links:
        if link_exists(link):
            sh("ip", "link", "del", link)
    for d in state.cgroups:
        done.cgroups += remove_cgroup(Path(d))
    paths = [Path(p) for p in reversed(state.paths)]
    for p in paths:
        if p.is_file():
            p.unlink()
    shutil.rmtree(state.dir, ignore_errors=True)
    for p in paths:
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    return done


def lab_pids(state: LabState) -> set[int]:
    """Every process in the lab's cgroups or namespaces: sshd, sessions and all they started."""
    pids = set()
    for h in state.hosts:
        for d in cgroup_dirs(h):
            try:
                pids |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            except FileNotFoundError:
                pass
    present = namespaces()
    for ns in state.netns:
        if ns in present:
            pids |= {int(p) for p in sh("ip", "netns", "pids", ns).stdout.split()}
    return {p for p in pids if alive(p)}


def end_processes(state: LabState) -> int:
    ended: set[int] = set()
    for sig, wait in ((signal.SIGTERM, 2.0), *[(signal.SIGKILL, 0.2)] * 25):
        pids = lab_pids(state)
        if not pids:
            return len(ended)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        ended |= pids
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and lab_pids(state):
            time.sleep(0.05)
    raise TestbedError(f"lab {state.name}: processes {sorted(lab_pids(state))} survive SIGKILL")


def remove_cgroup(d: Path) -> int:
    for _ in range(40):
        try:
            d.rmdir()
            return 1
        except FileNotFoundError:
            return 0
        except OSError:
            time.sleep(0.05)  # the last exiting processes are still leaving it
    raise TestbedError(f"cannot remove cgroup {d}: processes remain in it")


# --- status and use -------------------------------------------------------------------------

def status_table(state: LabState) -> str:
    present = namespaces()
    uplink = "present" if link_exists(state.uplink) else "missing"
    lines = [f"lab {state.name} in {state.dir}",
             f"this machine: {state.address} on {state.uplink} ({uplink})",
             f"client key:   {state.key_file}", f"known_hosts:  {state.known_hosts}", ""]
    rows = [("host", "address", "namespace", "sshd", "cpu quota", "memory limit", "tbf rate")]
    for h in state.hosts:
        cpu, memory = cgroup_dirs(h)
        pid = state.pids.get(h.name, 0)
        rows.append((h.name, f"{h.address}:{h.port}", h.netns if h.netns in present else f"{h.netns} (missing)",
                     f"{pid} {'up' if pid and alive(pid) else 'down'}", cpu_quota(cpu), memory_limit(memory),
                     tbf_rate(h.netns) if h.netns in present else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def cpu_quota(d: Path) -> str:
    try:
        quota, period = (int((d / f).read_text()) for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    except OSError:
        return "(no cgroup)"
    return f"{quota / period:.2f} CPU" if quota > 0 else "none"


def memory_limit(d: Path) -> str:
    try:
        return f"{int((d / 'memory.limit_in_bytes').read_text()) / 2**20:.0f} MiB"
    except OSError:
        return "(no cgroup)"


def tbf_rate(netns: str) -> str:
    proc = sh("tc", "-n", netns, "-j", "qdisc", "show", "dev", "tb0", check=False)
    if proc.returncode:
        return "?"  # entering a namespace takes root
    qdiscs = json.loads(proc.stdout or "[]")
    rates = [q["options"]["rate"] for q in qdiscs if q.get("kind") == "tbf"]
    return f"{rates[0] * 8 / 1e6:g} mbit" if rates else "none"


def run_on(state: LabState, host: str, command: str, timeout: float = 600) -> tuple[int, str, str]:
    """Run a command on a lab host over SSH (paramiko), verifying its key against the lab's known_hosts."""
    import paramiko

    h = state.host(host)
    client = paramiko.SSHClient()
    client.load_host_keys(state.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(h.address, h.port, username=h.user, key_filename=state.key_file, timeout=10,
                   look_for_keys=False, allow_agent=False)
    try:
        _, out, err = client.exec_command(command, timeout=timeout)
        stdout, stderr = out.read().decode(), err.read().decode()
        return out.channel.recv_exit_status(), stdout, stderr
    finally:
        client.close()
