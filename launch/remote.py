"""What `testbed deploy` runs on a host, one command at a time:

    python - COMMAND ARGS...   (this file on stdin)

    check MODULE...           the interpreter's version and the modules it cannot find, as JSON
    venv DIR                  a venv at DIR that sees this interpreter's packages (kept if made)
    memory RUN_DIR            [OOM kills so far, memory limit in MiB] of the cgroup ranks start in
    port RUN_DIR              a free TCP port on this host
    stop RUN_DIR GRACE_S      stop the rank whose process group RUN_DIR/rank.pid names: SIGTERM,
                              then SIGKILL after GRACE_S; says `stopped` or `still running`

Deploy sends the file rather than running the pushed copy because check, venv and the stopping
of a killed deploy's leftovers come before this run's project is on the host.  So it imports
only the standard library at the top and keeps to Python 3.6's syntax: an interpreter too old
for the project must be reported as such, not fail on a syntax error.  memory and port run once
the project is in RUN_DIR and import from it.
"""
import importlib.util
import json
import os
import signal
import site
import subprocess
import sys
import time
from typing import Callable, List


def check(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    print(json.dumps({"version": list(sys.version_info[:2]), "missing": missing}))


def venv(path: str) -> None:
    if not os.path.exists(os.path.join(path, "bin", "python")):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", path], check=True)
    if sys.prefix != sys.base_prefix:
        # a venv made from a venv sees only the base interpreter's packages: let it see this one's too
        inner = subprocess.run([os.path.join(path, "bin", "python"), "-c",
                                "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip()
        with open(os.path.join(inner, "_testbed_parent.pth"), "w") as f:
            f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages()) + "\n")


def memory(run_dir: str) -> None:
    sys.path.insert(0, run_dir)
    from testbed.measure.memory import memory_limit_mb, oom_kills

    print(json.dumps([oom_kills(), memory_limit_mb()]))


def port(run_dir: str) -> None:
    sys.path.insert(0, run_dir)
    from launch.net import free_port

    print(free_port(""))


def stop(run_dir: str, grace_s: str) -> None:
    try:
        with open(os.path.join(run_dir, "rank.pid")) as f:
            group = int(f.read())
    except (OSError, ValueError):  # no rank was started there
        print("stopped")
        return
    print("stopped" if stop_group(group, float(grace_s), lambda: group_gone(group)) else "still running")


def group_gone(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: the id is another user's now
        return True
    return False


def stop_group(group: int, grace_s: float, gone: Callable[[], bool]) -> bool:
    """SIGTERM to a process group, then SIGKILL if it is not `gone` within grace_s; whether it is
    gone.  Deploy stops a rank here the same way."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if gone():
            return True
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return True
        end = time.monotonic() + grace_s
        while not gone() and time.monotonic() < end:
            time.sleep(0.1)
    return gone()


COMMANDS = {"check": check, "venv": venv, "memory": memory, "port": port, "stop": stop}


def main(argv: List[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
