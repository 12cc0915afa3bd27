"""Fuzzed configs and overrides: every input gives a config or a TestbedError, never a traceback."""
from hypothesis import HealthCheck, example, given, settings

from launch.faults.fuzzing import (check_config_text, check_mapping,
                                   check_yaml_document, config_mappings,
                                   config_sections, config_texts)
from testbed.core.config import from_dict
from testbed.core.errors import TestbedError


@settings(max_examples=400, deadline=None)
@given(config_mappings)
def test_fuzzed_mappings(raw):
    check_mapping(raw)


@settings(max_examples=400, deadline=None)
@given(config_sections)
def test_fuzzed_sections(raw):
    check_mapping(raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config_texts)
@example(("", ["\nh5=e"]))  # found by bench/faults.py: the key's newline split the error in two lines
@example(("rounds: 0b_", []))  # PyYAML raises ValueError on `0b_`
@example(("", ["train.lr=0b_"]))
def test_fuzzed_files_and_overrides(tmp_path, text_and_sets):
    check_config_text(tmp_path, text_and_sets)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config_mappings)
def test_fuzzed_yaml_documents(tmp_path, raw):
    check_yaml_document(tmp_path, raw)


def test_non_finite_numbers_are_refused():
    for value in (float("nan"), float("inf")):
        try:
            from_dict({"train": {"lr": value}})
        except TestbedError as exc:
            assert "train.lr" in str(exc)
        else:
            raise AssertionError(f"train.lr={value} was accepted")
