"""The data's records as they pass between loading, sharding, tokenising and training."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
    proxy: Split | None = None  # data.proxy_file: the server's public rows, labelled like the training data


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
    proxy: Tokens | None = None  # the server's public proxy set (data.proxy_file); None in an agent process
