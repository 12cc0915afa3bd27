"""The documentation stays true to the code: the generated configuration reference is current,
every reference page exists, the layers in docs/architecture.md are tests/test_layers.py's, the
module paths and links the docs name exist, and the README stays a front door."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from testbed.core import configdoc


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ["config", "cli", "strategies", "distributed", "deployment", "lab", "security", "reliability",
         "benchmarks", "architecture"]
README_LINES = 250


def markdown() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_config_reference_is_current():
    assert (DOCS / "config.md").read_text() == configdoc.render(), (
        f"docs/config.md is stale: run `{configdoc.COMMAND}` from the project root and commit docs/config.md")


def test_every_config_key_is_documented():
    undocumented = [k.key for s in configdoc.sections() for k in s.keys if not k.doc]
    assert undocumented == [], "give these fields a doc= text in testbed/core/config.py or options.py"


def test_every_reference_page_exists():
    missing = [p for p in PAGES if not (DOCS / f"{p}.md").is_file()]
    assert missing == []
    for p in PAGES:
        assert (DOCS / f"{p}.md").read_text().startswith("# "), f"docs/{p}.md: no title"


def test_readme_is_a_front_door():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_LINES, f"README.md has {lines} lines; the reference belongs in docs/"
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text


def declared_layers() -> list[tuple[str, ...]]:
    """LAYERS as tests/test_layers.py declares it (read, not imported: test modules import none other)."""
    tree = ast.parse((ROOT / "tests" / "test_layers.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "LAYERS")
    return [tuple(layer) for layer in ast.literal_eval(node.value)]


def documented_layers() -> list[tuple[str, ...]]:
    """The first cells of the table under docs/architecture.md's `## Layers`."""
    text = (DOCS / "architecture.md").read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [tuple(re.findall(r"`([\w.]+)`", cell)) for cell in rows]


def test_architecture_lists_the_declared_layers():
    assert documented_layers() == declared_layers()


def test_named_module_paths_exist():
    """Every module path (or bench script) the docs name in backticks is in the repository."""
    wrong = []
    for page in markdown():
        for path in re.findall(r"`((?:testbed|launch|tests)/[\w/.-]*|bench/\w+\.py)`", page.read_text()):
            if not (ROOT / path).exists():
                wrong.append(f"{page.relative_to(ROOT)}: {path}")
    assert wrong == []


def test_links_between_pages_resolve():
    broken = []
    for page in markdown():
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
