"""Labels as ids (integers as they are, strings named in order), and causal-LM responses from
label words."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from testbed.core.config import DataConfig
from testbed.core.errors import TestbedError
from testbed.core.files import atomic_write
from testbed.data.records import Split, Splits, Table


def label_responses(splits: Splits, cfg: DataConfig) -> Splits:
    """Task causal_lm without a response column: each row's response is its label's word."""
    words = cfg.label_words or splits.label_names
    if not words:
        raise TestbedError("data.label_words: task causal_lm needs a response for each integer label "
                           "(label_words, in id order) or a data.response_column")
    if len(words) < splits.num_labels:
        raise TestbedError(f"data.label_words: {len(words)} words for {splits.num_labels} labels")
    if len(set(words)) < len(words):
        raise TestbedError(f"data.label_words: lists a word twice ({', '.join(map(repr, words))})")

    def answered(split: Split) -> Split:
        return dataclasses.replace(split, responses=[words[y] for y in split.labels])

    proxy = None if splits.proxy is None else answered(splits.proxy)
    return dataclasses.replace(splits, train=answered(splits.train), test=answered(splits.test), proxy=proxy,
                               options=list(words))


def label_ids(train: Table, test: Table, cfg: DataConfig) -> tuple[Split, Split, list[str] | None]:
    """Labels as ids, and the names of string labels.  Integer labels are ids already (less
    label_offset); others are named by `data.labels`, in its order, or else by the sorted
    training labels."""
    for table in (train, test):
        _check_labelled(table)
    if not cfg.labels and all(_is_int(v) for v in train.labels):
        return Split(train.texts, _int_ids(train, cfg)), Split(test.texts, _int_ids(test, cfg)), None
    if cfg.label_offset:
        why = "data.labels names them" if cfg.labels else f"{train.where} holds string labels"
        raise TestbedError(f"data.label_offset: applies to integer labels only ({why})")
    names = cfg.labels or sorted({str(v) for v in train.labels})
    if len(set(names)) < len(names):
        raise TestbedError(f"data.labels: lists a label twice ({', '.join(names)})")
    ids = {name: i for i, name in enumerate(names)}
    for table, known in ((train, "data.labels"), (test, "data.labels" if cfg.labels else "the training labels")):
        if (bad := next((v for v in table.labels if str(v) not in ids), None)) is not None:
            raise TestbedError(f"{'data.labels' if cfg.labels else table.label_key}: {table.where} has label "
                               f"{str(bad)!r}, which is not among {known} ({', '.join(names)})")
    return (Split(train.texts, [ids[str(v)] for v in train.labels]),
            Split(test.texts, [ids[str(v)] for v in test.labels]), names)


def labelled_like(table: Table, splits: Splits, cfg: DataConfig) -> Split:
    """Another file's rows with the run's label ids: by name where the run's labels are strings,
    else integers less label_offset; a label the run's data does not have is refused."""
    if table.responses is not None:  # responses from a column: no labels
        return Split(table.texts, table.labels, table.responses)
    _check_labelled(table)
    if splits.label_names is None:
        ids = _int_ids(table, cfg)
    else:
        index = {name: i for i, name in enumerate(splits.label_names)}
        ids = [index.get(str(v), -1) for v in table.labels]
    if (row := next((r for r, i in enumerate(ids) if not 0 <= i < splits.num_labels), None)) is not None:
        raise TestbedError(f"{table.label_key}: {table.where} has label {table.labels[row]!r} in row {row + 1}, "
                           f"which the run's data does not have")
    return Split(table.texts, ids)


def _check_labelled(table: Table) -> None:
    if (row := next((i for i, v in enumerate(table.labels) if v is None or v == ""), None)) is not None:
        raise TestbedError(f"{table.label_key}: {table.where} has no label in row {row + 1}")


def _is_int(value) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return True


def _int_ids(table: Table, cfg: DataConfig) -> list[int]:
    if (bad := next((v for v in table.labels if not _is_int(v)), None)) is not None:
        raise TestbedError(f"{table.label_key}: {table.where} has label {bad!r}, not an integer "
                           f"as the training labels are")
    return [int(v) - cfg.label_offset for v in table.labels]


def write_labels(names: list[str] | None, folder: Path) -> None:
    """labels.json in a run directory: string labels' names, by id (none for integer labels).  A
    resumed run's must be the same: its checkpoint's head was trained with those ids."""
    path = folder / "labels.json"
    if path.is_file() and json.loads(path.read_text()) != names:
        raise TestbedError(f"{path}: the run's labels were {json.loads(path.read_text())}, the data now gives "
                           f"{names}: the data files changed since the run started")
    if names is not None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "labels.json", (json.dumps(names) + "\n").encode())
