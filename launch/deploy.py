"""`testbed deploy -i INVENTORY CONFIG`: one distributed run on the hosts of an inventory, over SSH.

Every host is connected to (host keys checked) and checked (its interpreter and the packages
an agent imports; `--bootstrap` installs missing ones into a venv) before anything starts, and
every problem is reported, one line per host.  Then each host gets a per-run directory
`{testbed_workdir}/{host}/{run name}` (mode 0700) holding the project, the run's config, the
files the config names (data, model directory, profile) and the run's secret (0600), and runs
`python -m launch.mpi` with torchrun-style RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT and
TESTBED_SECRET_FILE.  Each agent host is one device of the run, named after the host.  Rank 0,
the aggregator, runs here, or on the host whose testbed_role is aggregator (its run directory
is copied back).  Agents' output streams to runs/NAME/agents/HOST.log.  At the end, on Ctrl-C
or on any failure, every rank is stopped and the per-run directories are removed.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import posixpath
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import paramiko
import yaml

from launch.inventory import Host, load_inventory
from launch.ssh import (HostProblem, KnownHosts, Result, connect, get_tree,
                        makedirs, put_files, run, where, write_private)
from testbed.core.config import ExperimentConfig, load_config, to_dict
from testbed.core.errors import TestbedError
from testbed.core.files import atomic_write
from testbed.model.load import BUNDLED

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("testbed", "launch", "inventory/profiles")  # what a rank imports or reads
DISTRIBUTION = "fedpeft-testbed"
# What an agent imports, by module, and the distribution (in setup.cfg) that provides it.
AGENT_MODULES = {"torch": "torch", "transformers": "transformers", "peft": "peft", "datasets": "datasets",
                 "yaml": "pyyaml", "psutil": "psutil", "tqdm": "tqdm"}
PYTHON_MIN = (3, 10)
PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")  # same offline mode everywhere
STOP_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1  # prctl(2)
LIBC = ctypes.CDLL(None)  # loaded here: a child between fork and exec must not load libraries
AGENTS_GRACE_S = 15.0  # after rank 0 ends, for agents to act on its goodbye


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


@dataclass
class Session:
    """A connected host whose interpreter has what an agent needs."""

    host: Host
    client: paramiko.SSHClient
    python: str
    base: str  # absolute {testbed_workdir}/{host}
    run_dir: str = ""  # base/{run name}, once made
    memory: tuple[int, float] | None = None  # OOM kills so far and memory limit (MB) as its rank sees them


@dataclass
class Rank:
    """One started launch.mpi process, here (proc) or on a host (chan)."""

    rank: int
    name: str  # the host, or "here"
    log: Path
    proc: subprocess.Popen | None = None
    chan: paramiko.Channel | None = None
    pump: threading.Thread | None = None

    def status(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        if self.chan.exit_status_ready():
            return self.chan.exit_status  # -1: killed by a signal, or closed without a status
        return None if self.chan.get_transport().is_active() else -1  # the connection is lost


def deploy(opts: DeployOptions) -> int:
    hosts = load_inventory(opts.inventory)
    cfg = load_config(opts.config, opts.sets)
    agents = [h for h in hosts if h.role == "agent"]
    if not agents:
        raise TestbedError(f"{opts.inventory}: no agent hosts (every host has testbed_role=aggregator)")
    sessions = open_sessions(hosts, known_hosts(hosts, opts), agent_modules(cfg), opts.bootstrap)
    try:
        if opts.check_only:
            return 0
        return run_deployed(opts, cfg, sessions)
    finally:
        for s in sessions.values():
            s.client.close()


def known_hosts(hosts: list[Host], opts: DeployOptions) -> dict[str, KnownHosts]:
    """Host -> the known_hosts file its key is checked against (hosts naming one file share it)."""
    files: dict[Path, KnownHosts] = {}
    out = {}
    for h in hosts:
        path = opts.known_hosts or Path(h.known_hosts or "~/.ssh/known_hosts").expanduser()
        out[h.name] = files.setdefault(path, KnownHosts(path, opts.accept_new_host_keys))
    return out


def agent_modules(cfg: ExperimentConfig) -> dict[str, str]:
    """Module -> pip requirement (as setup.cfg states it) for everything an agent imports."""
    needed = dict(AGENT_MODULES)
    if cfg.model.name in BUNDLED:
        needed[BUNDLED[cfg.model.name]] = BUNDLED[cfg.model.name].replace("_", "-")
    try:
        declared = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise TestbedError(f"deploy: the {DISTRIBUTION} package is not installed here (run `make install`)") from None
    by_name = {canonical(re.split(r"[\s<>=!~;\[]", r, 1)[0]): r.split(";")[0].strip() for r in declared}
    return {module: by_name.get(canonical(dist), dist) for module, dist in needed.items()}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- connecting and checking -----------------------------------------------------------------

def open_sessions(hosts: list[Host], known: dict[str, KnownHosts], modules: dict[str, str],
                  bootstrap: bool) -> dict[str, Session]:
    """Connect to and check every host at once; report every problem, then fail if there was one."""
    def one(host: Host) -> Session | str:
        try:
            return ready(host, known[host.name], modules, bootstrap)
        except (HostProblem, OSError, paramiko.SSHException) as exc:
            return f"{where(host)}: {exc}"

    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        ordered = list(pool.map(one, hosts))
    for k in known.values():
        k.save_new()  # once per file: saving empties its list
    problems = [r for r in ordered if isinstance(r, str)]
    sessions = {r.host.name: r for r in ordered if isinstance(r, Session)}
    for s in sessions.values():
        print(f"testbed: {where(s.host)}: ready ({s.python})", file=sys.stderr)
    if problems:
        for s in sessions.values():
            s.client.close()
        for line in problems:
            print(f"testbed: error: {line}", file=sys.stderr)
        raise TestbedError(f"{len(problems)} of {len(hosts)} hosts not ready; nothing was started")
    return sessions


def ready(host: Host, known: KnownHosts, modules: dict[str, str], bootstrap: bool) -> Session:
    client = connect(host, known)
    try:
        base = workdir(client, host)
        python = host.python
        missing = check_python(client, python, modules)
        if missing and bootstrap:
            python = make_venv(client, python, posixpath.join(base, "venv"), [modules[m] for m in missing])
            missing = check_python(client, python, modules)
        if missing:
            hint = "" if bootstrap else f"; pass --bootstrap to install them into a venv in {base}"
            raise HostProblem(f"{python} lacks {', '.join(modules[m] for m in missing)}{hint}")
        return Session(host, client, python, base)
    except BaseException:
        client.close()
        raise


def workdir(client: paramiko.SSHClient, host: Host) -> str:
    """The host's absolute {testbed_workdir}/{host}: relative workdirs start at the login directory."""
    with client.open_sftp() as sftp:
        home = sftp.normalize(".")
    path = host.workdir[2:] if host.workdir.startswith("~/") else host.workdir
    return posixpath.join(home, path, host.name)


CHECK = """
import importlib.util, json, sys
print(json.dumps({"version": list(sys.version_info[:2]),
                  "missing": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]}))
"""


def check_python(client: paramiko.SSHClient, python: str, modules: dict[str, str]) -> list[str]:
    """The modules `python` lacks; HostProblem if it does not run or is too old."""
    res = python_script(client, python, CHECK, list(modules), timeout=120)
    if res.status in (126, 127):
        raise HostProblem(f"interpreter {python} not found (ansible_python_interpreter)")
    try:
        found = yaml.safe_load(res.output.strip().splitlines()[-1])
        version, missing = tuple(found["version"]), list(found["missing"])
    except (IndexError, KeyError, TypeError, yaml.YAMLError):
        raise HostProblem(f"interpreter {python} failed: {last_line(res.output)}") from None
    if version < PYTHON_MIN:
        raise HostProblem(f"{python} is Python {version[0]}.{version[1]}; "
                          f"the project needs {PYTHON_MIN[0]}.{PYTHON_MIN[1]} or newer")
    return missing


def python_script(client: paramiko.SSHClient, python: str, script: str, args: list[str],
                  timeout: float = 60.0) -> Result:
    """Run a Python script (sent on stdin, so it needs no quoting) with `python - ARGS`."""
    return run(client, " ".join([shlex.quote(python), "-", *map(shlex.quote, args)]), stdin=script, timeout=timeout)


VENV = """
import os, site, subprocess, sys
venv = sys.argv[1]
if not os.path.exists(os.path.join(venv, "bin", "python")):
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
if sys.prefix != sys.base_prefix:
    # a venv made from a venv sees only the base interpreter's packages: let it see this one's too
    inner = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(inner, "_testbed_parent.pth"), "w") as f:
        f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages()) + "\\n")
"""


def make_venv(client: paramiko.SSHClient, python: str, venv: str, requirements: list[str]) -> str:
    """`--bootstrap`: a venv that sees the interpreter's packages, plus the missing ones from pip."""
    res = python_script(client, python, VENV, [venv], timeout=300)
    if res.status != 0:
        raise HostProblem(f"cannot create a venv at {venv}: {last_line(res.output)}")
    venv_python = posixpath.join(venv, "bin", "python")
    cmd = [venv_python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements]
    res = run(client, " ".join(map(shlex.quote, cmd)), timeout=3600)
    if res.status != 0:
        raise HostProblem(f"pip install {' '.join(requirements)} failed: {last_line(res.output)}")
    return venv_python


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# -- the run ---------------------------------------------------------------------------------

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
        pushed = parallel(lambda s: push(s, opts.out.name, raw, files, secret, state if s is aggregator else []),
                          list(sessions.values()))
        print(f"testbed: pushed the project and {len(files)} named files to {len(sessions)} hosts "
              f"({sum(pushed) / 1e6:.1f} MB, {time.monotonic() - start:.1f} s)", file=sys.stderr)
        start_ranks(ranks, cfg, aggregator, agents, opts.out, opts.resume,
                    lambda env, log: start_here(raw, files, secret, local_dir, opts.out, opts.resume, env, log))
        print(f"testbed: started rank 0 {'on ' + aggregator.host.name if aggregator else 'here'} and "
              f"{len(agents)} agents in {time.monotonic() - start:.1f} s", file=sys.stderr)
        code = wait(ranks, lambda r: causes.setdefault(r.name, death_cause(sessions[r.name])))
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


def parallel(fn: Callable[[Session], Any], sessions: list[Session]) -> list[Any]:
    """fn on every session at once; a HostProblem becomes one error naming the host."""
    def one(s: Session) -> Any:
        try:
            return fn(s)
        except (HostProblem, OSError, paramiko.SSHException) as exc:
            raise TestbedError(f"{where(s.host)}: {exc}") from None

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(sessions)))) as pool:
        return list(pool.map(one, sessions))


def run_config(cfg: ExperimentConfig, agents: list[Host]) -> dict:
    """The resolved config every rank runs: one device per agent host, named after it, in
    inventory order (device i is served by rank i + 1)."""
    raw = to_dict(cfg)
    raw["devices"] = {h.name: {"count": 1, "device_class": h.profile or "reference", "memory_mb": h.memory_mb}
                      for h in agents}
    return raw


def named_files(raw: dict) -> dict[str, Path]:
    """Config key -> local file or directory the ranks must read (absolute)."""
    keys = ["model.profile"] + (["data.train_file", "data.test_file"] if raw["data"]["source"] == "files" else [])
    found = {key: Path(get_key(raw, key)).resolve() for key in keys if get_key(raw, key)}
    name = raw["model"]["name"]
    if name not in BUNDLED and Path(name).exists():
        found["model.name"] = Path(name).resolve()
    for key, path in found.items():
        if not path.exists():
            raise TestbedError(f"{key}: {path} not found")
    return found


def get_key(raw: dict, key: str) -> Any:
    node = raw
    for part in key.split("."):
        node = node[part]
    return node


def with_paths(raw: dict, paths: dict[str, str]) -> dict:
    out = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy of plain data
    for key, value in paths.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[last] = value
    return out


def push(s: Session, name: str, raw: dict, files: dict[str, Path], secret: bytes,
         state: list[tuple[Path, str]]) -> int:
    """Make the host's run directory and copy in the project, the named files, the config, the
    secret and (a resumed run's aggregator host) the run's state; return the bytes sent."""
    run_dir = posixpath.join(s.base, name)
    remote = {key: posixpath.join(run_dir, "files", key, path.name) for key, path in files.items()}
    todo = [(p, p.relative_to(ROOT).as_posix()) for p in project_files()]
    for key, path in files.items():
        tree = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        base = path if path.is_dir() else path.parent
        todo += [(p, posixpath.join("files", key, path.name if path.is_dir() else "", p.relative_to(base).as_posix()))
                 for p in tree]
    todo += state
    with s.client.open_sftp() as sftp:
        makedirs(sftp, s.base)
        try:
            sftp.mkdir(run_dir, 0o700)
        except OSError:
            raise HostProblem(f"{run_dir} exists already (a run of that name is going on, or was interrupted); "
                              f"remove it, pick another --out, or continue that run with --resume") from None
        s.run_dir = run_dir
        sent = put_files(sftp, todo, run_dir)
        with sftp.open(posixpath.join(run_dir, "config.yaml"), "w") as f:
            f.write(yaml.safe_dump(with_paths(raw, remote), sort_keys=False))
        write_private(sftp, posixpath.join(run_dir, "secret"), secret)
    s.memory = memory_state(s)
    return sent


MEMORY = """
import json, sys
sys.path.insert(0, sys.argv[1])
from testbed.measure.memory import memory_limit_mb, oom_kills
print(json.dumps([oom_kills(), memory_limit_mb()]))
"""


def memory_state(s: Session) -> tuple[int, float] | None:
    """The host's count of OOM kills (in the memory cgroup its processes start in) and its
    memory limit; None where that cannot be read."""
    res = python_script(s.client, s.python, MEMORY, [s.run_dir])
    try:
        kills, limit = json.loads(last_line(res.output))
        return int(kills), float(limit)
    except (ValueError, TypeError):
        return None


def death_cause(s: Session) -> str:
    """Why the host's agent died, where the host can say: the OOM killer, if it fired there since
    the run started."""
    now = memory_state(s) if s.memory else None
    if now is None or now[0] <= s.memory[0]:
        return ""
    return f"the kernel's OOM killer fired in its memory cgroup (limit {now[1]:.0f} MB)"


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


def run_state(out: Path) -> list[tuple[Path, str]]:
    """A resumed run's state for a remote aggregator, as `run/...` in its run directory: all rank
    0 wrote there but the logs, which stream back here."""
    logs = {out / "aggregator.log", out / "agents"}
    return [(p, posixpath.join("run", p.relative_to(out).as_posix())) for p in sorted(out.rglob("*"))
            if p.is_file() and not logs & {p, *p.parents}]


def clear_leftover(s: Session, out: Path, aggregator: bool) -> None:
    """--resume: stop what is left of the run on the host (a deploy that was killed leaves its
    ranks and run directory) and remove it; an aggregator host's run state is fetched first,
    since it is newer than what was copied back here, if anything was."""
    run_dir = posixpath.join(s.base, out.name)
    res = python_script(s.client, s.python, STOP, [run_dir, str(STOP_GRACE_S)], timeout=60)
    if last_line(res.output) != "stopped":
        raise HostProblem(f"what is left of the run in {run_dir} did not stop: {last_line(res.output)}")
    if aggregator:
        fetch_run(s, out, run_dir)
    run(s.client, f"rm -rf -- {shlex.quote(run_dir)}", timeout=60)


def project_files() -> list[Path]:
    return [p for top in PROJECT for p in sorted((ROOT / top).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts]


def rendezvous_point(cfg: ExperimentConfig, aggregator: Session | None, agents: list[Session]) -> tuple[str, int]:
    """Rank 0's address as the agents reach it, and a free port there."""
    from launch.net import free_port, route_address

    if aggregator is None:
        addr = cfg.dist.master_addr or route_address(agents[0].host.address)
        return addr, cfg.dist.master_port or free_port(addr)
    addr = cfg.dist.master_addr or aggregator.host.address
    if cfg.dist.master_port:
        return addr, cfg.dist.master_port
    script = "import socket, sys\ns = socket.socket()\ns.bind(('', 0))\nprint(s.getsockname()[1])\n"
    res = python_script(aggregator.client, aggregator.python, script, [])
    if res.status != 0:
        raise TestbedError(f"{where(aggregator.host)}: cannot pick a free port: {last_line(res.output)}")
    return addr, int(res.output.split()[-1])


def start_ranks(ranks: list[Rank], cfg: ExperimentConfig, aggregator: Session | None, agents: list[Session],
                out: Path, resume: bool, here: Callable[[dict[str, str], Path], Rank]) -> None:
    """Rank 0, then the agents; each is appended as it starts, so that a failure stops those up."""
    addr, port = rendezvous_point(cfg, aggregator, agents)
    print(f"testbed: rendezvous at {addr}:{port}", file=sys.stderr)
    env = {"WORLD_SIZE": str(len(agents) + 1), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
           "PYTHONUNBUFFERED": "1", **{k: os.environ[k] for k in PASSED_ENV if k in os.environ}}
    log = out / "aggregator.log"
    ranks.append(start_remote(aggregator, 0, env, log, echo=True, resume=resume) if aggregator else here(env, log))
    for i, s in enumerate(agents, 1):
        ranks.append(start_remote(s, i, env, out / "agents" / f"{s.host.name}.log"))


def start_remote(s: Session, rank: int, env: dict[str, str], log: Path, echo: bool = False,
                 resume: bool = False) -> Rank:
    """launch.mpi on the host as its own process group (its pid, the group's id, in rank.pid)."""
    variables = {**env, "RANK": str(rank), "TESTBED_SECRET_FILE": posixpath.join(s.run_dir, "secret")}
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())
    command = (f"cd {shlex.quote(s.run_dir)} && echo $$ > rank.pid && export {exports} && "
               f"exec {shlex.quote(s.python)} -m launch.mpi config.yaml {'--resume' if resume else '--out'} run")
    chan = s.client.get_transport().open_session(timeout=30)
    chan.set_combine_stderr(True)
    chan.exec_command(command)
    chan.shutdown_write()
    r = Rank(rank, s.host.name, log, chan=chan)
    r.pump = threading.Thread(target=pump, args=(chan.recv, log, sys.stderr.buffer if echo else None), daemon=True)
    r.pump.start()
    return r


def start_here(raw: dict, files: dict[str, Path], secret: bytes, local_dir: Path, out: Path, resume: bool,
               env: dict[str, str], log: Path) -> Rank:
    config = local_dir / "config.yaml"
    config.write_text(yaml.safe_dump(with_paths(raw, {k: str(p) for k, p in files.items()}), sort_keys=False))
    secret_file = local_dir / "secret"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    proc = subprocess.Popen([sys.executable, "-m", "launch.mpi", str(config), "--resume" if resume else "--out",
                             str(out)], cwd=ROOT, preexec_fn=die_with_parent,
                            env={**os.environ, **env, "RANK": "0", "TESTBED_SECRET_FILE": str(secret_file),
                                 "PYTHONPATH": path},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # Ctrl-C reaches us only: we stop it in order
    r = Rank(0, "here", log, proc=proc)
    r.pump = threading.Thread(target=pump, args=(lambda n: proc.stdout.read1(n), log, sys.stderr.buffer),
                              daemon=True)
    r.pump.start()
    return r


def die_with_parent() -> None:
    """In the child, before exec: the kernel kills it if deploy dies (Linux), as a controller
    that crashed takes its rank 0 with it; the run is then continued with --resume."""
    if hasattr(LIBC, "prctl"):
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def pump(read: Callable[[int], bytes], log: Path, echo: IO[bytes] | None) -> None:
    """Copy a rank's output into its log (and to our stderr) as it comes."""
    with open(log, "ab") as f:
        while data := read(65536):
            f.write(data)
            f.flush()
            if echo is not None:
                echo.write(data)
                echo.flush()


def wait(ranks: list[Rank], cause: Callable[[Rank], str]) -> int:
    """Rank 0's exit status, once it is out; agents that end badly are reported as they do, with
    their `cause` where the host knows it."""
    reported: set[int] = set()

    def report() -> None:
        for r in ranks[1:]:
            code = r.status()
            if code not in (None, 0) and r.rank not in reported:
                reported.add(r.rank)
                why = cause(r)
                print(f"testbed: {r.name}: agent (rank {r.rank}) exited with status {code}"
                      f"{': ' + why if why else ''}; see {r.log}", file=sys.stderr)

    while (code := ranks[0].status()) is None:
        report()
        time.sleep(0.2)
    deadline = time.monotonic() + AGENTS_GRACE_S
    while any(r.status() is None for r in ranks[1:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    report()
    return code


STOP = """
import os, signal, sys, time
try:
    group = int(open(os.path.join(sys.argv[1], "rank.pid")).read())
except (OSError, ValueError):
    group = 0
def gone():
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return True
    return False
for sig in (signal.SIGTERM, signal.SIGKILL):
    if group and not gone():
        os.killpg(group, sig)
        end = time.monotonic() + float(sys.argv[2])
        while not gone() and time.monotonic() < end:
            time.sleep(0.1)
print("stopped" if not group or gone() else "still running")
"""


def stop(ranks: list[Rank], sessions: dict[str, Session], aggregator: Session | None, out: Path) -> None:
    """Stop every rank (here first), keep the remote aggregator's run, remove the run directories."""
    start = time.monotonic()
    if running := sum(r.status() is None for r in ranks):
        print(f"testbed: stopping {running} running ranks", file=sys.stderr)
    here = next((r for r in ranks if r.proc is not None), None)
    if here is not None:
        stop_here(here.proc)
    made = [s for s in sessions.values() if s.run_dir]

    def one(s: Session) -> str:
        try:
            res = python_script(s.client, s.python, STOP, [s.run_dir, str(STOP_GRACE_S)], timeout=60)
            if s is aggregator:
                fetch_run(s, out)
            run(s.client, f"rm -rf -- {shlex.quote(s.run_dir)}", timeout=60)
        except (HostProblem, OSError, paramiko.SSHException) as exc:
            return f"{where(s.host)}: could not stop its rank and remove {s.run_dir}: {exc or 'connection lost'}"
        return "" if last_line(res.output) == "stopped" else f"{where(s.host)}: its rank did not stop"

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(made)))) as pool:
        for problem in pool.map(one, made):
            if problem:
                print(f"testbed: warning: {problem}", file=sys.stderr)
    for r in ranks:
        if r.pump is not None:
            r.pump.join(timeout=5)
    if made:
        print(f"testbed: stopped the ranks and removed the run directories on {len(made)} hosts "
              f"({time.monotonic() - start:.1f} s)", file=sys.stderr)


def fetch_run(s: Session, out: Path, run_dir: str = "") -> None:
    """The remote aggregator's run directory (in `run_dir`, default its session's), as far as it got."""
    remote = posixpath.join(run_dir or s.run_dir, "run")
    with s.client.open_sftp() as sftp:
        try:
            sftp.stat(remote)
        except FileNotFoundError:
            return
        get_tree(sftp, remote, out)


def stop_here(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
