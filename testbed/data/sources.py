"""Local files (by extension) and hub splits read into Tables: texts or prompts, and labels or
responses, from the configured columns."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from testbed.core.config import CAUSAL_LM, DataConfig
from testbed.core.errors import TestbedError
from testbed.data.prompts import as_text, render_prompts
from testbed.data.records import Table


# Local files by extension.  CSV is read as written by spreadsheets (quotes group a field); TSV
# and TXT are plain tab-separated text: no quoting and no missing-value markers, so a field
# with commas, quotes or "NA" in it is read exactly as written.
FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PLAIN_TEXT = {".tsv", ".txt"}


def load_file(cfg: DataConfig, key: str, task: str) -> Table:
    import datasets

    path = Path(getattr(cfg, key))
    if not getattr(cfg, key):
        raise TestbedError(f"data.{key}: required when data.source is 'files'")
    if not path.is_file():
        raise TestbedError(f"data.{key}: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise TestbedError(f"data.{key}: {path}: unsupported file type "
                           f"(use .csv, .tsv, .txt, .json, .jsonl or .parquet)")
    options = _reading_options(cfg, suffix, path)
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(FILE_TYPES[suffix], data_files=str(path), split="train", **options)
    except Exception as exc:  # datasets raises many kinds; the user needs the file and the reason
        raise TestbedError(f"data.{key}: cannot read {path}: {str(exc).splitlines()[0]}") from None
    return _columns(table, cfg, key == "test_file", f"data.{key} ({path})", task)


def _reading_options(cfg: DataConfig, suffix: str, path: Path) -> dict:
    """What datasets' CSV reader is told for this file (its defaults are CSV's)."""
    if suffix not in (".csv", *PLAIN_TEXT):
        if cfg.delimiter:
            raise TestbedError(f"data.delimiter: applies to .csv, .tsv and .txt files, not to {path}")
        return {}
    options = dict(quoting=csv.QUOTE_NONE, keep_default_na=False, sep="\t") if suffix in PLAIN_TEXT else {}
    if cfg.delimiter:
        sep = "\t" if cfg.delimiter == "\\t" else cfg.delimiter  # `\t` as typed after --set
        if len(sep) != 1:
            raise TestbedError(f"data.delimiter: {cfg.delimiter!r} is not one character (a tab: \"\\t\")")
        options["sep"] = sep
    return options


def load_hub(cfg: DataConfig, task: str) -> tuple[Table, Table]:
    # Offline unless HF_HUB_OFFLINE=0 says otherwise: a dataset not in the cache then fails at
    # once, instead of after a minute of retries where the hub cannot be reached.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    if not cfg.hub_name:
        raise TestbedError("data.hub_name: required when data.source is 'hub'")
    name = repr(cfg.hub_name) + (f" (configuration {cfg.hub_config!r})" if cfg.hub_config else "")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config or None)
    except ConnectionError:
        if not datasets.config.HF_HUB_OFFLINE:
            raise TestbedError(f"data.hub_name: cannot reach the hub for {name}") from None
        raise TestbedError(f"data.hub_name: {name} is not in the local cache, and the hub is not asked while "
                           f"HF_HUB_OFFLINE=1; fetch it by running once with HF_HUB_OFFLINE=0") from None
    except Exception as exc:
        raise TestbedError(f"data.hub_name: cannot load {name}: {str(exc).splitlines()[0]}") from None
    return _hub_split(ds, cfg, "train_split", task), _hub_split(ds, cfg, "test_split", task)


def _hub_split(ds, cfg: DataConfig, key: str, task: str) -> Table:
    split = getattr(cfg, key)
    if split not in ds:
        raise TestbedError(f"data.{key}: no split {split!r} in {cfg.hub_name!r} (splits: {', '.join(ds)})")
    table = _columns(ds[split], cfg, key == "test_split", f"{cfg.hub_name}[{split}]", task)
    if table.labels and all(v == -1 for v in table.labels):  # how GLUE-style test splits hide theirs
        hint = ("use data.test_split: validation" if key == "test_split" and "validation" in ds
                else f"splits: {', '.join(ds)}")
        raise TestbedError(f"data.{key}: {table.where} has no labels (every label is -1); {hint}")
    return table


def _columns(table, cfg: DataConfig, test: bool, where: str, task: str) -> Table:
    """The texts (or prompts) and the labels (or responses) of one file or split: the test one's
    own columns where configured."""
    text_key = "test_text_columns" if test and cfg.test_text_columns else "text_columns"
    label_key = "test_label_column" if test and cfg.test_label_column else "label_column"
    texts = _texts(table, cfg, text_key, where)
    response_column = cfg.response_column or ("output" if cfg.prompt == "alpaca" else "")
    if task == CAUSAL_LM and response_column:
        _need_columns(table, "response_column", [response_column], where)
        return Table(where, f"data.{label_key}", texts, [0] * len(texts), [as_text(v) for v in table[response_column]])
    _need_columns(table, label_key, [getattr(cfg, label_key)], where)
    return Table(where, f"data.{label_key}", texts, list(table[getattr(cfg, label_key)]))


def _need_columns(table, key: str, columns: list[str], where: str) -> None:
    for col in columns:
        if col not in table.column_names:
            raise TestbedError(f"data.{key}: column {col!r} not in {where} "
                               f"(columns: {', '.join(table.column_names)})")


def _texts(table, cfg: DataConfig, text_key: str, where: str) -> list[str]:
    """Each row's text: the prompt template over its columns, else its text columns joined."""
    if cfg.prompt:
        return render_prompts(cfg.prompt, {c: table[c] for c in table.column_names}, where)
    _need_columns(table, text_key, getattr(cfg, text_key), where)
    return [" ".join(str(v) for v in row if v is not None) for row in zip(*(table[c] for c in getattr(cfg, text_key)))]
