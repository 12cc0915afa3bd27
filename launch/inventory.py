"""Inventory: which hosts exist and how to reach them, in ansible's conventions.

Three forms are read: YAML (`all:` / `children:` / `hosts:` / `vars:`), INI (`[group]`,
`[group:vars]`, `[group:children]`, `host key=value ...`) and the JSON that
`ansible-inventory --list` prints (`_meta.hostvars`).  Host names may hold ranges such as
`jetson[01:04]` or `node[a:c]` (with an optional stride, `[0:10:2]`).  Variables merge as
ansible merges them: `all`, then groups from the shallowest to the deepest (siblings by name),
then the host's own.  A host's connection comes from the `ansible_*` variables; the testbed
reads `testbed_profile` (a device class, or a profile file `testbed profile` wrote on the
host), `testbed_memory_mb`, `testbed_role` (`agent` or `aggregator`), `testbed_workdir`,
`testbed_known_hosts` and `testbed_device` (the host's `model.device`).  Of ansible's templating, the magic
variables `{{ inventory_dir }}`, `{{ inventory_file }}` (absolute) and `{{ inventory_hostname }}`
are replaced in string values, so that an inventory can name files beside itself.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.core.devices import CLASSES
from testbed.core.errors import TestbedError
from testbed.model.placement import DEVICE

ROLES = ("agent", "aggregator")
PROFILE_FILES = (".yaml", ".yml", ".json")  # a testbed_profile ending so names a file `testbed profile` wrote


@dataclass
class Host:
    name: str
    address: str  # ansible_host, else the name
    port: int = 22
    user: str = ""  # ansible_user; empty: the SSH default
    key_file: str = ""  # ansible_ssh_private_key_file
    python: str = "python3"  # ansible_python_interpreter
    profile: str = ""  # testbed_profile: a device class; empty: measured only
    profile_file: str = ""  # testbed_profile naming a profile file measured on the host (its class: reference)
    memory_mb: float = 0.0  # testbed_memory_mb: the training budget; 0 = the class default
    role: str = "agent"
    workdir: str = "testbed-runs"  # testbed_workdir, relative to the login directory unless absolute
    known_hosts: str = ""  # testbed_known_hosts: verify host keys against this file; empty: ~/.ssh/known_hosts
    device: str = ""  # testbed_device: model.device on this host (auto, cpu, cuda, cuda:N, mps); empty: the config's
    groups: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Group:
    hosts: dict[str, dict] = field(default_factory=dict)  # host -> its own vars
    vars: dict[str, Any] = field(default_factory=dict)
    children: list[str] = field(default_factory=list)


def load_inventory(path: str | Path) -> list[Host]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TestbedError(f"{path}: inventory not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TestbedError(f"{path}: cannot read the inventory: {exc}") from None
    where = str(path)
    if path.suffix == ".json":
        groups = _from_json(text, where)
    elif path.suffix in (".yaml", ".yml"):
        groups = _from_yaml(text, where)
    else:
        groups = _from_ini(text, where)
    return _hosts(groups, where)


def expand(pattern: str, where: str = "inventory") -> list[str]:
    """`jetson[01:04]` -> jetson01..jetson04; `n[a:c]` -> na, nb, nc; several ranges multiply."""
    m = re.search(r"\[([^\]]*)\]", pattern)
    if not m:
        return [pattern]
    parts = m.group(1).split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise TestbedError(f"{where}: host pattern {pattern!r}: expected [start:end] or [start:end:stride]")
    start, end = parts[0], parts[1]
    try:
        stride = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise TestbedError(f"{where}: host pattern {pattern!r}: the stride must be an integer") from None
    if stride < 1:
        raise TestbedError(f"{where}: host pattern {pattern!r}: the stride must be positive")
    if start.isdigit() and end.isdigit():
        width = len(start) if start.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(start), int(end) + 1, stride)]
    elif len(start) == len(end) == 1 and start.isalpha() and end.isalpha():
        items = [chr(c) for c in range(ord(start), ord(end) + 1, stride)]
    else:
        raise TestbedError(f"{where}: host pattern {pattern!r}: a range is numbers or single letters")
    if not items:
        raise TestbedError(f"{where}: host pattern {pattern!r}: the range is empty")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [name for item in items for name in expand(head + item + tail, where)]


def _from_yaml(text: str, where: str) -> dict[str, _Group]:
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: PyYAML's number parsing, e.g. of `0b_`
        raise TestbedError(f"{where}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not raw:
        raise TestbedError(f"{where}: expected a mapping of groups (usually `all:`)")
    groups: dict[str, _Group] = {"all": _Group()}

    def visit(name: str, body: Any, parent: str | None) -> None:
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise TestbedError(f"{where}: group {name}: expected a mapping, got {body!r}")
        if unknown := sorted(set(body) - {"hosts", "vars", "children"}):
            raise TestbedError(f"{where}: group {name}: unknown key {unknown[0]!r} "
                               f"(a group holds hosts, vars and children)")
        group = groups.setdefault(name, _Group())
        if parent and name not in groups[parent].children:
            groups[parent].children.append(name)
        for pattern, hostvars in _mapping(body.get("hosts"), f"group {name}: hosts", where).items():
            for host in expand(str(pattern), where):
                group.hosts.setdefault(host, {}).update(_mapping(hostvars, f"host {host}", where))
        group.vars.update(_mapping(body.get("vars"), f"group {name}: vars", where))
        for child, child_body in _mapping(body.get("children"), f"group {name}: children", where).items():
            visit(str(child), child_body, name)

    for name, body in raw.items():
        visit(str(name), body, None if name == "all" else "all")
    return groups


def _from_ini(text: str, where: str) -> dict[str, _Group]:
    groups: dict[str, _Group] = {"all": _Group()}
    section, kind = "ungrouped", "hosts"
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        at = f"{where}, line {number}"
        if line.startswith("["):
            m = re.fullmatch(r"\[([^\]:\s]+)(?::(vars|children))?\]", line)
            if not m:
                raise TestbedError(f"{at}: bad section header {line!r}")
            section, kind = m.group(1), m.group(2) or "hosts"
            groups.setdefault(section, _Group())
            continue
        group = groups.setdefault(section, _Group())
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise TestbedError(f"{at}: {exc}") from None
        if kind == "vars":
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise TestbedError(f"{at}: expected key=value in [{section}:vars]")
            group.vars[key.strip()] = _ini_value(value.strip())
        elif kind == "children":
            group.children.append(words[0])
            groups.setdefault(words[0], _Group())
        else:
            hostvars = {}
            for word in words[1:]:
                key, sep, value = word.partition("=")
                if not sep or not key:
                    raise TestbedError(f"{at}: host {words[0]}: expected key=value, got {word!r}")
                hostvars[key] = _ini_value(value)
            for host in expand(words[0], at):
                group.hosts.setdefault(host, {}).update(hostvars)
    for name in groups:
        if name != "all" and not any(name in g.children for g in groups.values()):
            groups["all"].children.append(name)
    return groups


def _from_json(text: str, where: str) -> dict[str, _Group]:
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise TestbedError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise TestbedError(f"{where}: expected the object that `ansible-inventory --list` prints")
    hostvars = _mapping(_mapping(raw.get("_meta"), "_meta", where).get("hostvars"), "_meta.hostvars", where)
    groups: dict[str, _Group] = {"all": _Group()}
    for name, body in raw.items():
        if name == "_meta":
            continue
        body = _mapping(body, f"group {name}", where)
        group = groups.setdefault(name, _Group())
        hosts = body.get("hosts") or []
        if not isinstance(hosts, list):
            raise TestbedError(f"{where}: group {name}: hosts must be a list")
        for host in hosts:
            group.hosts[str(host)] = dict(_mapping(hostvars.get(host), f"host {host}", where))
        group.vars.update(_mapping(body.get("vars"), f"group {name}: vars", where))
        children = body.get("children") or []
        if not isinstance(children, list):
            raise TestbedError(f"{where}: group {name}: children must be a list")
        group.children += [str(c) for c in children]
    for g in list(groups.values()):  # the listing leaves out empty groups it names as children
        for child in g.children:
            groups.setdefault(child, _Group())
    return groups


def _hosts(groups: dict[str, _Group], where: str) -> list[Host]:
    for name, g in groups.items():
        if missing := [c for c in g.children if c not in groups]:
            raise TestbedError(f"{where}: group {name}: child group {missing[0]!r} is not defined")
    depth = _depths(groups, where)
    order = sorted(groups, key=lambda n: (depth.get(n, 1), n))
    found: dict[str, tuple[dict, list[str]]] = {}
    for name in order:  # shallow groups first, so that deeper ones override them
        for host in _members(groups, name):
            merged, member_of = found.setdefault(host, ({}, []))
            merged.update(groups[name].vars)
            if name != "all":
                member_of.append(name)
    out = []
    for host, (merged, member_of) in found.items():
        for name in order:
            merged.update(groups[name].hosts.get(host, {}))  # the host's own vars win
        out.append(_host(host, _magic(merged, host, where), member_of, where))
    if not out:
        raise TestbedError(f"{where}: no hosts")
    if sum(h.role == "aggregator" for h in out) > 1:
        raise TestbedError(f"{where}: more than one host has testbed_role=aggregator")
    return out


MAGIC = re.compile(r"\{\{\s*(inventory_dir|inventory_file|inventory_hostname)\s*\}\}")


def _magic(v: dict, host: str, where: str) -> dict:
    """Replace ansible's magic variables in string values (nothing else of Jinja)."""
    path = Path(where).resolve()
    known = {"inventory_dir": str(path.parent), "inventory_file": str(path), "inventory_hostname": host}
    return {k: MAGIC.sub(lambda m: known[m.group(1)], x) if isinstance(x, str) else x for k, x in v.items()}


def _members(groups: dict[str, _Group], name: str, seen: frozenset = frozenset()) -> list[str]:
    if name in seen:
        return []
    hosts = list(groups[name].hosts)
    for child in groups[name].children:
        hosts += [h for h in _members(groups, child, seen | {name}) if h not in hosts]
    return hosts


def _depths(groups: dict[str, _Group], where: str) -> dict[str, int]:
    depth = {"all": 0}
    frontier = ["all"]
    while frontier:
        nxt = []
        for name in frontier:
            for child in groups[name].children:
                if child == name or depth.get(child, -1) > 50:
                    raise TestbedError(f"{where}: group {child} is its own ancestor")
                if depth.get(child, -1) < depth[name] + 1:
                    depth[child] = depth[name] + 1
                    nxt.append(child)
        frontier = nxt
    return depth


def _host(name: str, v: dict, groups: list[str], where: str) -> Host:
    at = f"{where}: host {name}"
    try:
        port = int(v.get("ansible_port", 22))
        memory = float(v.get("testbed_memory_mb", 0))
    except (TypeError, ValueError):
        raise TestbedError(f"{at}: ansible_port and testbed_memory_mb must be numbers") from None
    if not 0 < port < 65536:
        raise TestbedError(f"{at}: ansible_port {port} is not a port")
    if memory < 0:
        raise TestbedError(f"{at}: testbed_memory_mb must not be negative")
    role = str(v.get("testbed_role", "agent"))
    if role not in ROLES:
        raise TestbedError(f"{at}: testbed_role {role!r} is not one of {', '.join(ROLES)}")
    profile, profile_file = str(v.get("testbed_profile", "")), ""
    if profile.endswith(PROFILE_FILES):
        if not Path(profile).is_file():
            raise TestbedError(f"{at}: testbed_profile {profile} not found")
        profile, profile_file = "", str(Path(profile).resolve())
    elif profile and profile not in CLASSES:
        raise TestbedError(f"{at}: testbed_profile {profile!r} is neither a device class (known: {', '.join(CLASSES)}) "
                           f"nor a profile file ({', '.join(PROFILE_FILES)})")
    device = str(v.get("testbed_device", ""))
    if device and not DEVICE.fullmatch(device):
        raise TestbedError(f"{at}: testbed_device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return Host(name=name, address=str(v.get("ansible_host", name)), port=port, user=str(v.get("ansible_user", "")),
                key_file=str(v.get("ansible_ssh_private_key_file", "")),
                python=str(v.get("ansible_python_interpreter", "python3")), profile=profile,
                profile_file=profile_file, memory_mb=memory,
                role=role, workdir=str(v.get("testbed_workdir", "testbed-runs")),
                known_hosts=str(v.get("testbed_known_hosts", "")), device=device, groups=groups, vars=dict(v))


def _mapping(value: Any, what: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TestbedError(f"{where}: {what}: expected a mapping, got {value!r}")
    return value


def _ini_value(text: str) -> Any:
    """INI values are YAML scalars in ansible (`22` is a number, `yes` a boolean)."""
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):  # ValueError: PyYAML's number parsing, e.g. of `0b_`
        return text
    return value if isinstance(value, (str, int, float, bool)) or value is None else text


def hostfile(hosts: list[Host]) -> str:
    """An Open MPI hostfile: rank 0 (the aggregator) first, then one slot per agent host."""
    aggregator = [h for h in hosts if h.role == "aggregator"]
    first = [f"{aggregator[0].address} slots=1"] if aggregator else ["localhost slots=1"]
    return "\n".join(first + [f"{h.address} slots=1" for h in hosts if h.role == "agent"]) + "\n"
