"""Data: loading (hub, local files, synthetic), partitioning across devices, tokenisation.

Texts are tokenised once per run; every device then indexes into the same tensors.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from testbed.core.config import DataConfig
from testbed.core.errors import TestbedError


@dataclass
class Split:
    texts: list[str]
    labels: list[int]


@dataclass
class Tokens:
    input_ids: torch.Tensor  # (n, max_length)
    attention_mask: torch.Tensor
    labels: torch.Tensor

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


def load_splits(cfg: DataConfig, seed: int) -> tuple[Split, Split, int]:
    if cfg.source == "synthetic":
        train, test = synthetic_topics(cfg, seed)
    elif cfg.source == "files":
        train = _load_files(cfg, "train_file")
        test = _load_files(cfg, "test_file")
    else:
        train, test = _load_hub(cfg)
    train, test = _limit(train, cfg.max_train, seed), _limit(test, cfg.max_test, seed + 1)
    labels = set(train.labels) | set(test.labels)
    if min(labels) < 0:
        raise TestbedError(f"data.label_offset: labels become negative ({min(labels)}); "
                           f"check the offset ({cfg.label_offset})")
    return train, test, max(labels) + 1


def _load_files(cfg: DataConfig, key: str) -> Split:
    import datasets

    path = Path(getattr(cfg, key))
    if not getattr(cfg, key):
        raise TestbedError(f"data.{key}: required when data.source is 'files'")
    if not path.is_file():
        raise TestbedError(f"data.{key}: file not found: {path}")
    kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise TestbedError(f"data.{key}: {path}: unsupported file type (use .csv, .json, .jsonl or .parquet)")
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many kinds; the user needs the file and the reason
        raise TestbedError(f"data.{key}: cannot read {path}: {str(exc).splitlines()[0]}") from None
    return _columns(table, cfg, f"data.{key} ({path})")


def _load_hub(cfg: DataConfig) -> tuple[Split, Split]:
    import datasets

    if not cfg.hub_name:
        raise TestbedError("data.hub_name: required when data.source is 'hub'")
    try:
        ds = datasets.load_dataset(cfg.hub_name)
    except Exception as exc:
        raise TestbedError(f"data.hub_name: cannot load {cfg.hub_name!r}: {str(exc).splitlines()[0]}") from None
    return (_columns(ds["train"], cfg, f"{cfg.hub_name}[train]"),
            _columns(ds["test"], cfg, f"{cfg.hub_name}[test]"))


def _columns(table, cfg: DataConfig, where: str) -> Split:
    for col in [*cfg.text_columns, cfg.label_column]:
        if col not in table.column_names:
            key = "label_column" if col == cfg.label_column else "text_columns"
            raise TestbedError(f"data.{key}: column {col!r} not in {where} "
                               f"(columns: {', '.join(table.column_names)})")
    texts = [" ".join(str(v) for v in row if v is not None)
             for row in zip(*(table[c] for c in cfg.text_columns))]
    try:
        labels = [int(v) - cfg.label_offset for v in table[cfg.label_column]]
    except (TypeError, ValueError):
        raise TestbedError(f"data.label_column: {cfg.label_column!r} in {where} holds non-integer labels") from None
    return Split(texts, labels)


def _limit(split: Split, n: int, seed: int) -> Split:
    if not n or n >= len(split.labels):
        return split
    idx = sorted(random.Random(seed).sample(range(len(split.labels)), n))
    return Split([split.texts[i] for i in idx], [split.labels[i] for i in idx])


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
        return Split([sentence(y) for y in labels], labels)

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
