"""SSH to inventory hosts with paramiko: verified host keys, one-shot commands, SFTP copies.

Host keys are checked against a known_hosts file.  An unknown key is refused unless the
caller accepts new keys (they are then added to the file); a key that differs from the one
on file is always refused.  Every failure is one line naming the host.
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import os
import posixpath
import socket
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from launch.inventory import Host

TIMEOUT_S = 15.0  # connecting, the SSH banner, authentication


class HostProblem(Exception):
    """What is wrong with one host, in one line (the caller prefixes the host)."""


def where(host: Host) -> str:
    return f"{host.name} ({host.address}:{host.port})"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: `ssh-ed25519 SHA256:...`."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


@dataclass
class KnownHosts:
    """The known_hosts file every connection checks, and the keys accepted on first use."""

    path: Path
    accept_new: bool = False
    new: list[tuple[str, paramiko.PKey]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def save_new(self) -> None:
        if not self.new:
            return
        keys = paramiko.HostKeys()
        if self.path.is_file():
            keys.load(str(self.path))
        for name, key in self.new:
            keys.add(name, key.get_name(), key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys.save(str(self.path))
        self.new.clear()


class _Policy(paramiko.MissingHostKeyPolicy):
    def __init__(self, known: KnownHosts):
        self.known = known

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.known.accept_new:
            raise HostProblem(f"host key not in {self.known.path} ({fingerprint(key)}); "
                              f"pass --accept-new-host-keys to trust it")
        with self.known.lock:
            self.known.new.append((hostname, key))


def connect(host: Host, known: KnownHosts) -> paramiko.SSHClient:
    """An authenticated connection to `host`, or HostProblem saying why not."""
    key_file = os.path.expanduser(host.key_file) if host.key_file else None
    if key_file and not os.path.isfile(key_file):
        raise HostProblem(f"ansible_ssh_private_key_file {host.key_file}: not found")
    user = host.user or getpass.getuser()
    client = paramiko.SSHClient()
    if known.path.is_file():
        client.load_host_keys(str(known.path))
    client.set_missing_host_key_policy(_Policy(known))
    try:
        client.connect(host.address, host.port, username=user, key_filename=key_file, timeout=TIMEOUT_S,
                       banner_timeout=TIMEOUT_S, auth_timeout=TIMEOUT_S, allow_agent=key_file is None,
                       look_for_keys=key_file is None)
    except HostProblem:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostProblem(f"host key {fingerprint(exc.key)} differs from the one in {known.path}: refusing to "
                          f"connect (if the host was reinstalled, remove its old entry)") from None
    except paramiko.AuthenticationException:
        client.close()
        raise HostProblem(f"authentication failed as {user}" + (f" with {host.key_file}" if key_file else "")) \
            from None
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        client.close()
        reasons = {e.strerror or str(e) for e in exc.errors.values()}
        raise HostProblem(f"cannot connect: {', '.join(sorted(reasons))}") from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        client.close()
        raise HostProblem(f"cannot connect: {getattr(exc, 'strerror', None) or exc or type(exc).__name__}") \
            from None
    client.get_transport().set_keepalive(5)  # notice a cut link instead of waiting on it forever
    return client


@dataclass
class Result:
    status: int  # -1: killed by a signal or the connection was lost
    output: str  # stdout and stderr, interleaved


def run(client: paramiko.SSHClient, command: str, stdin: str = "", timeout: float = 600.0) -> Result:
    """Run one command to completion; `stdin` is written to it and closed."""
    chan = client.get_transport().open_session(timeout=TIMEOUT_S)
    try:
        chan.settimeout(timeout)
        chan.set_combine_stderr(True)
        chan.exec_command(command)
        if stdin:
            chan.sendall(stdin.encode())
        chan.shutdown_write()
        chunks = []
        while data := chan.recv(65536):
            chunks.append(data)
        return Result(chan.recv_exit_status(), b"".join(chunks).decode(errors="replace"))
    except socket.timeout:
        raise HostProblem(f"`{command.split()[0]} ...` did not finish within {timeout:g} s") from None
    finally:
        chan.close()


def makedirs(sftp: paramiko.SFTPClient, path: str, mode: int = 0o755) -> None:
    """`mkdir -p` over SFTP."""
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if not sub:
            continue
        try:
            sftp.stat(sub)
        except FileNotFoundError:
            try:
                sftp.mkdir(sub, mode)
            except OSError:  # made meanwhile by another session (hosts may share a file system)
                if not stat.S_ISDIR(sftp.stat(sub).st_mode or 0):
                    raise


def put_files(sftp: paramiko.SFTPClient, files: list[tuple[Path, str]], root: str) -> int:
    """Copy (local file, path relative to `root`) pairs; return the bytes sent."""
    made = set()
    sent = 0
    for local, rel in files:
        target = posixpath.join(root, rel)
        parent = posixpath.dirname(target)
        if parent not in made:
            makedirs(sftp, parent)
            made.add(parent)
        sftp.put(str(local), target)
        sent += local.stat().st_size
    return sent


def write_private(sftp: paramiko.SFTPClient, path: str, data: bytes) -> None:
    """A file only its owner can read: created empty, made 0600, then written."""
    with sftp.open(path, "wb"):
        pass
    sftp.chmod(path, 0o600)
    with sftp.open(path, "wb") as f:
        f.write(data)


def get_tree(sftp: paramiko.SFTPClient, remote: str, local: Path) -> None:
    local.mkdir(parents=True, exist_ok=True)
    for entry in sftp.listdir_attr(remote):
        src = posixpath.join(remote, entry.filename)
        if stat.S_ISDIR(entry.st_mode):
            get_tree(sftp, src, local / entry.filename)
        else:
            sftp.get(src, str(local / entry.filename))
