"""Hypothesis strategies for the config and inventory parsers, and what a clear outcome is:
a result, or a TestbedError of one line (naming the file, for inventories).  Shared by the
fuzz tests and bench/faults.py; needs hypothesis (the `test` extra)."""
from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import strategies as st

from launch.inventory import load_inventory
from testbed.core.config import ExperimentConfig, from_dict, load_config
from testbed.core.errors import TestbedError

KEYS = ["seed", "rounds", "eval_every", "target_accuracy", "clock", "strategy", "model", "data", "devices",
        "train", "wire", "dist", "name", "lora", "rank", "alpha", "targets", "source", "partition", "alpha",
        "jetson-tx2", "laptop", "count", "memory_mb", "speed", "local_steps", "lr", "dtype", "fedlora",
        "droppeft", "legend", "fedpruner", "maxima", "bandit", "deadline_s", "profile", "unknown"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(KEYS))
trees = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), scalars), kids, max_size=5)),
    max_leaves=25)
config_mappings = st.dictionaries(st.sampled_from(KEYS), trees, max_size=6)

SECTIONS = {"strategy": ["name", "clients_per_round", "maxima", "bandit", "deadline_factor", "selection"],
            "model": ["name", "max_length", "lora", "profile", "threads"],
            "devices": ["laptop", "jetson-tx2", "agx-orin", "nope"],
            "data": ["source", "alpha", "partition", "text_columns", "train_file"],
            "train": ["lr", "local_steps", "batch_size"], "dist": ["deadline_s", "profile", "master_port"]}
# one section, with keys it knows and values of any shape
config_sections = st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda s: st.dictionaries(st.sampled_from(SECTIONS[s]), trees, max_size=4).map(lambda body: {s: body}))
# a config file's text and --set overrides
config_texts = st.tuples(st.text(max_size=200), st.lists(st.text(max_size=30), max_size=3))
# an inventory file: its form (by suffix) and a text made of the characters its syntax uses
inventory_texts = st.tuples(st.sampled_from([".yaml", ".ini", ".json"]), st.text(
    alphabet=st.sampled_from(list("[]:={}\n ,#ab01-_\"'allhostsvarschildren")), max_size=120))


def check_config(thunk) -> None:
    """`thunk` gives a config or raises a one-line TestbedError; anything else fails."""
    try:
        assert isinstance(thunk(), ExperimentConfig)
    except TestbedError as exc:
        assert str(exc) and "\n" not in str(exc), f"unclear error: {exc!r}"


def check_mapping(raw: dict) -> None:
    check_config(lambda: from_dict(raw))


def check_config_text(folder: Path, text_and_sets: tuple[str, list[str]]) -> None:
    text, sets = text_and_sets
    path = folder / "exp.yaml"
    path.write_text(text)
    check_config(lambda: load_config(path, sets))


def check_yaml_document(folder: Path, raw: dict) -> None:
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    check_config(lambda: load_config(path))


def check_inventory(folder: Path, suffix_and_text: tuple[str, str]) -> None:
    """Hosts, or a TestbedError naming the file."""
    suffix, text = suffix_and_text
    path = folder / f"fuzz{suffix}"
    path.write_text(text)
    try:
        assert load_inventory(path)
    except TestbedError as exc:
        assert str(path) in str(exc), f"error without the file's name: {exc!r}"
