"""launch/remote.py as deploy runs it on a host: `python - COMMAND ARGS` with the file on stdin,
before the project may be there."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

REMOTE = Path(__file__).resolve().parent.parent / "launch" / "remote.py"


def remote(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the project in reach
    return subprocess.run([sys.executable, "-", *args], input=REMOTE.read_text(), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_it_stands_alone_and_an_old_interpreter_can_read_it():
    tree = ast.parse(REMOTE.read_text(), feature_version=(3, 6))  # fails on newer syntax
    top = [a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names]
    top += [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert top and all(name.split(".")[0] in sys.stdlib_module_names for name in top), top


def test_check_says_the_version_and_the_missing_modules(tmp_path):
    res = remote("check", "json", "no_such_module", cwd=tmp_path)
    assert json.loads(res.stdout) == {"version": list(sys.version_info[:2]), "missing": ["no_such_module"]}


def test_stop_kills_a_rank_that_ignores_sigterm_and_says_stopped(tmp_path):
    rank = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); print(flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, start_new_session=True)
    rank.stdout.readline()  # SIGTERM is ignored from here on
    threading.Thread(target=rank.wait, daemon=True).start()  # reaped as a host's init would
    (tmp_path / "rank.pid").write_text(f"{rank.pid}\n")
    res = remote("stop", str(tmp_path), "0.5", cwd=tmp_path)
    assert res.stdout.strip() == "stopped", res.stderr
    assert rank.wait(timeout=10) == -9
    assert remote("stop", str(tmp_path / "never-started"), "0.5", cwd=tmp_path).stdout.strip() == "stopped"
