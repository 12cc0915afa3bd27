"""The README's tour, as a newcomer runs it: `make demo`, then every `sh` block of "A five-minute
tour", in a copy of the repository's tracked files with nothing beside it (the installed
environment linked in as `.venv`, the copy's code first on the path), from a shell whose
environment has none of the variables the Makefile and the other tests set."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import NO_LAB, ROOT

pytestmark = [pytest.mark.model, pytest.mark.dist]

TOUR = "## A five-minute tour"
LAB_BLOCK = "testbed lab up"


def tour_blocks(readme: str) -> list[str]:
    section = readme.split(TOUR, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The tracked files only, as a clone has them."""
    copy = tmp_path_factory.mktemp("tour") / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    (copy / ".venv").symlink_to(ROOT / ".venv")
    return copy


def shell(clone: Path, script: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "HF_", "PYTEST", "OMP_"))}
    env["PYTHONPATH"] = str(clone)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_ok(clone: Path, script: str) -> subprocess.CompletedProcess:
    proc = shell(clone, script)
    assert proc.returncode == 0, f"{script}\nfailed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_readme_has_a_tour_with_a_lab_block():
    blocks = tour_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 4 and sum(LAB_BLOCK in b for b in blocks) == 1


def test_make_demo_then_the_tour_runs_from_a_bare_clone(clone):
    assert run_ok(clone, ".venv/bin/python -c 'import testbed; print(testbed.__file__)'").stdout.startswith(str(clone))
    run_ok(clone, "make -o install demo")  # install: `make test` did it, into the linked .venv
    for block in tour_blocks((clone / "README.md").read_text()):
        if LAB_BLOCK not in block:
            run_ok(clone, block)
    summaries = {d: json.loads((clone / "runs" / d / "summary.json").read_text())
                 for d in ("quickstart", "ag", "ag-legend", "ag-mpi")}
    assert summaries["ag-legend"]["method"] == "legend" and summaries["ag-mpi"]["rounds"] == 2
    assert all(s["failures"] == [] for s in summaries.values())
    assert (clone / "runs" / "study-tour" / "report.md").is_file()
    assert (clone / "runs" / "ag-vs-legend" / "report.md").is_file()


@pytest.mark.lab
@pytest.mark.skipif(bool(NO_LAB), reason=NO_LAB)
def test_the_tour_lab_block_runs_and_takes_the_lab_down(clone):
    (block,) = [b for b in tour_blocks((clone / "README.md").read_text()) if LAB_BLOCK in b]
    down = next(line for line in block.splitlines() if "testbed lab down" in line)
    try:
        run_ok(clone, block)
    finally:
        shell(clone, down)  # after a failure too: the lab's namespaces and sshds are this machine's
    summary = json.loads((clone / "runs" / "lab" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["failures"] == []
