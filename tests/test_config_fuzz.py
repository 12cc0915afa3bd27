"""Fuzzed configs and overrides: every input gives a config or a TestbedError, never a traceback."""
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from testbed.config import ExperimentConfig, from_dict, load_config
from testbed.errors import TestbedError

KEYS = ["seed", "rounds", "eval_every", "target_accuracy", "clock", "strategy", "model", "data", "devices",
        "train", "wire", "dist", "name", "lora", "rank", "alpha", "targets", "source", "partition", "alpha",
        "jetson-tx2", "laptop", "count", "memory_mb", "speed", "local_steps", "lr", "dtype", "fedlora",
        "droppeft", "legend", "fedpruner", "maxima", "bandit", "deadline_s", "profile", "unknown"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(KEYS))
trees = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), scalars), kids, max_size=5)),
    max_leaves=25)


def admits(thunk) -> None:
    try:
        assert isinstance(thunk(), ExperimentConfig)
    except TestbedError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), trees, max_size=6))
def test_fuzzed_mappings(raw):
    admits(lambda: from_dict(raw))


SECTIONS = {"strategy": ["name", "clients_per_round", "maxima", "bandit", "deadline_factor", "selection"],
            "model": ["name", "max_length", "lora", "profile", "threads"],
            "devices": ["laptop", "jetson-tx2", "agx-orin", "nope"],
            "data": ["source", "alpha", "partition", "text_columns", "train_file"],
            "train": ["lr", "local_steps", "batch_size"], "dist": ["deadline_s", "profile", "master_port"]}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda s: st.tuples(st.just(s), st.dictionaries(st.sampled_from(SECTIONS[s]), trees, max_size=4))))
def test_fuzzed_sections(section):
    name, body = section
    admits(lambda: from_dict({name: body}))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200), sets=st.lists(st.text(max_size=30), max_size=3))
def test_fuzzed_files_and_overrides(tmp_path, text, sets):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    admits(lambda: load_config(path, sets))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(KEYS), trees, max_size=6))
def test_fuzzed_yaml_documents(tmp_path, raw):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    admits(lambda: load_config(path))


def test_non_finite_numbers_are_refused():
    for value in (float("nan"), float("inf")):
        try:
            from_dict({"train": {"lr": value}})
        except TestbedError as exc:
            assert "train.lr" in str(exc)
        else:
            raise AssertionError(f"train.lr={value} was accepted")
