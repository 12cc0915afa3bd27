"""Both splits of a run's data, and the server's proxy set, every file, column and label checked
(before the slow model load)."""
from __future__ import annotations

import dataclasses
import random

from testbed.core.config import CAUSAL_LM, DataConfig
from testbed.core.errors import TestbedError
from testbed.data.labels import label_ids, label_responses, labelled_like
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
    held = set(train.texts) | set(test.texts)  # every row of the data, sampled by this run or not
    train, test = _limit(train, cfg.max_train, seed), _limit(test, cfg.max_test, seed + 1)
    if names is not None:
        splits = Splits(train, test, len(names), names)
    else:
        labels = set(train.labels) | set(test.labels)
        if min(labels) < 0:
            raise TestbedError(f"data.label_offset: labels become negative ({min(labels)}); "
                               f"check the offset ({cfg.label_offset})")
        splits = Splits(train, test, max(labels) + 1)
    if cfg.proxy_file:
        splits = dataclasses.replace(splits, proxy=_proxy(cfg, task, splits, held))
    return label_responses(splits, cfg) if task == CAUSAL_LM and train.responses is None else splits


def _proxy(cfg: DataConfig, task: str, splits: Splits, held: set[str]) -> Split:
    """The server's public proxy set, labelled like the training data.  It stands for data a real
    server could hold, so it may share no row (`held`) with the training data, which the devices
    hold, or the test data, which no decision may see (whether this run samples the row or not)."""
    proxy = labelled_like(load_file(cfg, "proxy_file", task), splits, cfg)
    if len(proxy.texts) < 2:
        raise TestbedError(f"data.proxy_file: {len(proxy.texts)} rows; a probe compares at least 2")
    if shared := sum(text in held for text in proxy.texts):
        raise TestbedError(f"data.proxy_file: {shared} of its {len(proxy.texts)} rows are also rows of the training "
                           f"or test data; the server's proxy set must be public data apart from both")
    return proxy


def _limit(split: Split, n: int, seed: int) -> Split:
    if not n or n >= len(split.labels):
        return split
    idx = sorted(random.Random(seed).sample(range(len(split.labels)), n))
    responses = None if split.responses is None else [split.responses[i] for i in idx]
    return Split([split.texts[i] for i in idx], [split.labels[i] for i in idx], responses)
