"""Both splits of a run's data, every file, column and label checked (before the slow model load)."""
from __future__ import annotations

import random

from testbed.core.config import CAUSAL_LM, DataConfig
from testbed.core.errors import TestbedError
from testbed.data.labels import label_ids, label_responses
from testbed.data.records import Split, Splits
from testbed.data.sources import load_file, load_hub
from testbed.data.synthetic import synthetic_topics


def load_splits(cfg: DataConfig, seed: int, task: str = "classification") -> Splits:
    """Both splits, every file, column and label checked (this runs before the slow model load)."""
    names = None
    if cfg.source == "synthetic":
        train, test = synthetic_topics(cfg, seed)
    else:
        tables = ((load_file(cfg, "train_file", task), load_file(cfg, "test_file", task))
                  if cfg.source == "files" else load_hub(cfg, task))
        if tables[0].responses is not None:  # responses from a column: no labels
            train, test = (Split(t.texts, t.labels, t.responses) for t in tables)
        else:
            train, test, names = label_ids(*tables, cfg)
    train, test = _limit(train, cfg.max_train, seed), _limit(test, cfg.max_test, seed + 1)
    if names is not None:
        splits = Splits(train, test, len(names), names)
    else:
        labels = set(train.labels) | set(test.labels)
        if min(labels) < 0:
            raise TestbedError(f"data.label_offset: labels become negative ({min(labels)}); "
                               f"check the offset ({cfg.label_offset})")
        splits = Splits(train, test, max(labels) + 1)
    return label_responses(splits, cfg) if task == CAUSAL_LM and train.responses is None else splits


def _limit(split: Split, n: int, seed: int) -> Split:
    if not n or n >= len(split.labels):
        return split
    idx = sorted(random.Random(seed).sample(range(len(split.labels)), n))
    responses = None if split.responses is None else [split.responses[i] for i in idx]
    return Split([split.texts[i] for i in idx], [split.labels[i] for i in idx], responses)
