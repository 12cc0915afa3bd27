"""Data: loading (hub, local files, synthetic), labels as ids, prompts and responses (causal-LM
tasks), partitioning across devices, tokenisation.

Texts are tokenised once per run; every device then indexes into the same tensors.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from testbed.core.config import CAUSAL_LM, DataConfig
from testbed.core.errors import TestbedError
from testbed.core.files import atomic_write


@dataclass
class Split:
    texts: list[str]  # with task causal_lm, the prompts
    labels: list[int]  # all 0 where responses come from a column
    responses: list[str] | None = None  # task causal_lm: each row's response


@dataclass
class Splits:
    """What load_splits returns: both splits with labels as ids."""

    train: Split
    test: Split
    num_labels: int
    label_names: list[str] | None = None  # string labels, by id; None where the data's labels are integers
    options: list[str] | None = None  # task causal_lm: the closed set of responses (label words), by label id


@dataclass
class Table:
    """A file's or hub split's rows as read, before the labels become ids."""

    where: str  # how errors name it, e.g. "data.test_file (test.tsv)"
    label_key: str  # the config key naming its label column, e.g. "data.test_label_column"
    texts: list[str]
    labels: list
    responses: list[str] | None = None  # from data.response_column (task causal_lm)


@dataclass
class Choices:
    """Task causal_lm with label words: the closed set each row's response is one of, which
    accuracy chooses from."""

    options: list[list[int]]  # each label word's tokens, by label id
    answers: torch.Tensor  # (n,) each row's label id
    prompt_lengths: torch.Tensor  # (n,) tokens of each row's prompt, at the start of its input_ids


@dataclass
class Tokens:
    input_ids: torch.Tensor  # (n, max_length)
    attention_mask: torch.Tensor
    labels: torch.Tensor  # (n,) label ids; task causal_lm: (n, max_length) targets, -100 where no loss is taken
    choices: Choices | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                "labels": self.labels[idx]}


@dataclass
class Shard:
    """One device's data: indices into the run's training tokens."""

    train: list[int]
    val: list[int]


@dataclass
class Dataset:
    train: Tokens
    test: Tokens
    num_labels: int
    shards: dict[str, Shard]
    synthetic: bool
    label_names: list[str] | None = None  # see Splits


def load_splits(cfg: DataConfig, seed: int, task: str = "classification") -> Splits:
    """Both splits, every file, column and label checked (this runs before the slow model load)."""
    names = None
    if cfg.source == "synthetic":
        train, test = synthetic_topics(cfg, seed)
    else:
        tables = ((_load_files(cfg, "train_file", task), _load_files(cfg, "test_file", task))
                  if cfg.source == "files" else _load_hub(cfg, task))
        if tables[0].responses is not None:  # responses from a column: no labels
            train, test = (Split(t.texts, t.labels, t.responses) for t in tables)
        else:
            train, test, names = _label_ids(*tables, cfg)
    train, test = _limit(train, cfg.max_train, seed), _limit(test, cfg.max_test, seed + 1)
    if names is not None:
        splits = Splits(train, test, len(names), names)
    else:
        labels = set(train.labels) | set(test.labels)
        if min(labels) < 0:
            raise TestbedError(f"data.label_offset: labels become negative ({min(labels)}); "
                               f"check the offset ({cfg.label_offset})")
        splits = Splits(train, test, max(labels) + 1)
    return _label_responses(splits, cfg) if task == CAUSAL_LM and train.responses is None else splits


def _label_responses(splits: Splits, cfg: DataConfig) -> Splits:
    """Task causal_lm without a response column: each row's response is its label's word."""
    words = cfg.label_words or splits.label_names
    if not words:
        raise TestbedError("data.label_words: task causal_lm needs a response for each integer label "
                           "(label_words, in id order) or a data.response_column")
    if len(words) < splits.num_labels:
        raise TestbedError(f"data.label_words: {len(words)} words for {splits.num_labels} labels")
    if len(set(words)) < len(words):
        raise TestbedError(f"data.label_words: lists a word twice ({', '.join(map(repr, words))})")
    train, test = (dataclasses.replace(s, responses=[words[y] for y in s.labels]) for s in (splits.train, splits.test))
    return dataclasses.replace(splits, train=train, test=test, options=list(words))


# Local files by extension.  CSV is read as written by spreadsheets (quotes group a field); TSV
# and TXT are plain tab-separated text: no quoting and no missing-value markers, so a field
# with commas, quotes or "NA" in it is read exactly as written.
FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PLAIN_TEXT = {".tsv", ".txt"}


def _load_files(cfg: DataConfig, key: str, task: str) -> Table:
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


def _load_hub(cfg: DataConfig, task: str) -> tuple[Table, Table]:
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
        return Table(where, f"data.{label_key}", texts, [0] * len(texts), [_text(v) for v in table[response_column]])
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


# Alpaca's two templates (Taori et al., 2023): with an input, and without one.
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def render_prompts(template: str, columns: dict[str, list], where: str) -> list[str]:
    """`template` (data.prompt) filled with each row's columns; 'alpaca': Alpaca's template."""
    rows = len(next(iter(columns.values()), []))
    if template == "alpaca":
        if "instruction" not in columns:
            raise TestbedError(f"data.prompt: alpaca needs a column 'instruction', not in {where} "
                               f"(columns: {', '.join(columns)})")
        inputs = columns.get("input") or [""] * rows
        return [(ALPACA if _text(x) else ALPACA_NO_INPUT).format(instruction=_text(i), input=_text(x))
                for i, x in zip(columns["instruction"], inputs)]
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise TestbedError(f"data.prompt: not a valid template ({exc}); write a literal brace twice") from None
    if missing := sorted(f for f in fields if f not in columns):
        raise TestbedError(f"data.prompt: column {missing[0]!r} not in {where} (columns: {', '.join(columns)})")
    return [template.format_map({f: _text(columns[f][i]) for f in fields}) for i in range(rows)]


def _text(value) -> str:
    return "" if value is None else str(value)


def _label_ids(train: Table, test: Table, cfg: DataConfig) -> tuple[Split, Split, list[str] | None]:
    """Labels as ids, and the names of string labels.  Integer labels are ids already (less
    label_offset); others are named by `data.labels`, in its order, or else by the sorted
    training labels."""
    for table in (train, test):
        if (row := next((i for i, v in enumerate(table.labels) if v is None or v == ""), None)) is not None:
            raise TestbedError(f"{table.label_key}: {table.where} has no label in row {row + 1}")
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


def _limit(split: Split, n: int, seed: int) -> Split:
    if not n or n >= len(split.labels):
        return split
    idx = sorted(random.Random(seed).sample(range(len(split.labels)), n))
    responses = None if split.responses is None else [split.responses[i] for i in idx]
    return Split([split.texts[i] for i in idx], [split.labels[i] for i in idx], responses)


# A synthetic topic-classification task: each class has its own vocabulary; every
# sentence mixes topic words with shared filler, so the task needs the words' meaning.
_TOPICS = [
    "election minister parliament government treaty president vote diplomat embassy senate",
    "football match goal striker tournament coach league season championship referee",
    "market shares profit investor bank earnings stock revenue merger economy",
    "software chip computer internet research scientists laboratory robot satellite data",
    "recipe kitchen chef flavour bread dinner restaurant baking spices dessert",
    "symphony guitar concert album singer orchestra melody festival band rhythm",
    "hospital doctor patients vaccine medicine clinic nurse surgery virus treatment",
    "mountain river forest hiking island beach valley desert glacier canyon",
]
_FILLER = "the a of in on with for after before today new report says said week year".split()


def synthetic_topics(cfg: DataConfig, seed: int) -> tuple[Split, Split]:
    rng = random.Random(seed)
    topics = [t.split() for t in _TOPICS[: cfg.synthetic_classes]]

    def sentence(label: int) -> str:
        words = [rng.choice(topics[label]) for _ in range(3)] + [rng.choice(_FILLER) for _ in range(5)]
        # one word from another topic, so a single keyword does not give the answer away
        words.append(rng.choice(topics[rng.randrange(len(topics))]))
        rng.shuffle(words)
        return " ".join(words)

    def split(n: int) -> Split:
        labels = [rng.randrange(len(topics)) for _ in range(n)]
        texts = [sentence(y) for y in labels]
        return Split(render_prompts(cfg.prompt, {"text": texts}, "the synthetic data") if cfg.prompt else texts, labels)

    return split(cfg.synthetic_train), split(cfg.synthetic_test)


def partition(labels: list[int], devices: list[str], cfg: DataConfig, seed: int) -> dict[str, Shard]:
    """IID or Dirichlet(alpha) label-skew shards, each with a local validation split."""
    n, k = len(labels), len(devices)
    if n < k * cfg.min_per_client:
        raise TestbedError(f"devices: {k} devices need at least {k * cfg.min_per_client} training rows "
                           f"(data.min_per_client={cfg.min_per_client}); the data has {n}")
    rng = np.random.default_rng(seed)
    parts = _iid(n, k, rng) if cfg.partition == "iid" else _dirichlet(np.array(labels), k, cfg, rng)
    shards = {}
    for device, idx in zip(devices, parts):
        idx = sorted(int(i) for i in idx)
        rng.shuffle(idx)
        n_val = int(len(idx) * cfg.val_fraction)
        shards[device] = Shard(train=sorted(idx[n_val:]), val=sorted(idx[:n_val]))
    return shards


def _iid(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), k)


def _dirichlet(labels: np.ndarray, k: int, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class is split across devices by Dirichlet(alpha) proportions.

    Redrawn until every device holds at least min_per_client rows (bounded tries).
    """
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(k)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([cfg.alpha] * k)) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= cfg.min_per_client:
            return [np.array(p) for p in parts]
    raise TestbedError(f"data.alpha: no Dirichlet({cfg.alpha}) split gives every one of {k} devices "
                       f"{cfg.min_per_client} rows; raise alpha or lower data.min_per_client")


def tokenize(tokenizer, split: Split, max_length: int) -> Tokens:
    enc = tokenizer(split.texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return Tokens(enc["input_ids"], enc["attention_mask"], torch.tensor(split.labels, dtype=torch.long))


def tokenize_instructions(tokenizer, split: Split, max_length: int, chat: bool, options: list[str] | None) -> Tokens:
    """Task causal_lm: each row's prompt, then its response and EOS, right-padded to max_length.
    Targets are the response and EOS only: prompt and padding are -100 (no loss).  `chat`: the
    prompt is a user turn of the tokenizer's chat template, the response the assistant's answer.
    `options` (label words, by id): the closed set accuracy chooses from."""
    prompts = prompt_ids(tokenizer, split.texts, chat)
    responses = tokenizer(split.responses, add_special_tokens=False)["input_ids"]
    n = len(prompts)
    ids = torch.full((n, max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    targets = torch.full((n, max_length), -100, dtype=torch.long)
    lengths = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt, response = fit(prompt, response + [tokenizer.eos_token_id], max_length)
        end = len(prompt) + len(response)
        ids[i, :end] = torch.tensor(prompt + response)
        mask[i, :end] = 1
        targets[i, len(prompt):end] = torch.tensor(response)
        lengths.append(len(prompt))
    choices = None
    if options is not None:
        choices = Choices(tokenizer(options, add_special_tokens=False)["input_ids"],
                          torch.tensor(split.labels, dtype=torch.long), torch.tensor(lengths))
    return Tokens(ids, mask, targets, choices)


def prompt_ids(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Each prompt's tokens, as a user turn awaiting the assistant's answer where `chat`."""
    if not chat:
        return tokenizer(prompts)["input_ids"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template holds any special tokens


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """A prompt and response cut to max_length tokens together.  The response keeps its start and
    leaves the prompt at least half; a prompt too long loses its middle, so that its start (the
    instruction, a chat header) and its end (the cue the response follows) stay."""
    response = response[: max_length - min(len(prompt), max_length // 2)]
    room = max_length - len(response)
    if len(prompt) > room:
        prompt = prompt[: room - room // 2] + prompt[len(prompt) - room // 2:]
    return prompt, response
