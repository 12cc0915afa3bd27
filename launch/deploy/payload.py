"""What a deployed run takes with it: the project, the run's config rewritten for the hosts, the
files the config names (data, model directory, profile), the secret, and a resumed run's state.
Each host gets them in its run directory; rank 0 here gets its config and secret in a local one."""
from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

import yaml

from launch.deploy.hosts import Session
from launch.inventory import Host
from launch.ssh import HostProblem, makedirs, put_files, write_private
from testbed.core.config import ExperimentConfig, to_dict
from testbed.core.errors import TestbedError
from testbed.model.load import BUNDLED

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("testbed", "launch", "inventory/profiles")  # what a rank imports or reads


def run_config(cfg: ExperimentConfig, agents: list[Host]) -> dict:
    """The resolved config every rank runs: one device per agent host, named after it, in
    inventory order (device i is served by rank i + 1)."""
    raw = to_dict(cfg)
    raw["devices"] = {h.name: {"count": 1, "device_class": h.profile or "reference", "memory_mb": h.memory_mb,
                               "profile": h.profile_file} for h in agents}
    return raw


def named_files(raw: dict) -> dict[str, Path]:
    """Config key -> local file or directory the ranks must read (absolute)."""
    keys = ["model.profile", "data.proxy_file"] + (["data.train_file", "data.test_file"]
                                                   if raw["data"]["source"] == "files" else [])
    found = {key: Path(get_key(raw, key)).resolve() for key in keys if get_key(raw, key)}
    name = raw["model"]["name"]
    if name not in BUNDLED and Path(name).exists():
        found["model.name"] = Path(name).resolve()
    for host, spec in raw["devices"].items():  # profiles measured on the hosts, which rank 0 plans with
        if spec.get("profile"):
            found[f"devices.{host}.profile"] = Path(spec["profile"]).resolve()
    hub = raw["data"].get("hub_name")
    if raw["data"]["source"] == "hub" and hub and Path(hub).is_dir():  # a dataset saved locally, not a hub id
        found["data.hub_name"] = Path(hub).resolve()
    for key, path in found.items():
        if not path.exists():
            raise TestbedError(f"{key}: {path} not found")
    return found


def key_path(key: str) -> list[str]:
    """A dotted key's parts: `devices.HOST.profile` keeps a host name's own dots."""
    first, rest = key.split(".", 1)
    return [first, *rest.rsplit(".", 1)]


def get_key(raw: dict, key: str) -> Any:
    node = raw
    for part in key_path(key):
        node = node[part]
    return node


def with_paths(raw: dict, paths: dict[str, str]) -> dict:
    out = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy of plain data
    for key, value in paths.items():
        *parents, last = key_path(key)
        node = out
        for p in parents:
            node = node[p]
        node[last] = value
    return out


def project_files() -> list[Path]:
    return [p for top in PROJECT for p in sorted((ROOT / top).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts]


def run_state(out: Path) -> list[tuple[Path, str]]:
    """A resumed run's state for a remote aggregator, as `run/...` in its run directory: all rank
    0 wrote there but the logs, which stream back here."""
    logs = {out / "aggregator.log", out / "agents"}
    return [(p, posixpath.join("run", p.relative_to(out).as_posix())) for p in sorted(out.rglob("*"))
            if p.is_file() and not logs & {p, *p.parents}]


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
    return sent


def write_here(raw: dict, files: dict[str, Path], secret: bytes, local_dir: Path) -> tuple[Path, Path]:
    """Rank 0's config and secret (0600) in `local_dir`, for a rank 0 here; their paths."""
    config = local_dir / "config.yaml"
    config.write_text(yaml.safe_dump(with_paths(raw, {k: str(p) for k, p in files.items()}), sort_keys=False))
    secret_file = local_dir / "secret"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return config, secret_file
