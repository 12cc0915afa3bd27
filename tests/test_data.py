from collections import Counter

import pytest

from testbed.core.config import DataConfig
from testbed.core.errors import TestbedError
from testbed.data import load_splits, partition, synthetic_topics
from tests.helpers import AG_NEWS


def test_synthetic_is_seeded_and_balanced():
    cfg = DataConfig(synthetic_train=400, synthetic_test=100)
    a, _ = synthetic_topics(cfg, seed=1)
    b, _ = synthetic_topics(cfg, seed=1)
    c, _ = synthetic_topics(cfg, seed=2)
    assert a == b and a != c
    assert set(a.labels) == {0, 1, 2, 3} and min(Counter(a.labels).values()) > 60


def test_iid_partition_covers_everything_once():
    labels = [i % 4 for i in range(400)]
    shards = partition(labels, [f"d{i}" for i in range(5)], DataConfig(val_fraction=0.1), seed=0)
    every = [i for s in shards.values() for i in s.train + s.val]
    assert sorted(every) == list(range(400))
    assert all(len(s.val) == 8 and len(s.train) == 72 for s in shards.values())


def test_dirichlet_skews_labels_and_respects_minimum():
    labels = [i % 4 for i in range(2000)]
    cfg = DataConfig(partition="dirichlet", alpha=0.3, min_per_client=20, val_fraction=0)
    shards = partition(labels, [f"d{i}" for i in range(8)], cfg, seed=0)
    sizes = [len(s.train) for s in shards.values()]
    assert min(sizes) >= 20 and sum(sizes) == 2000
    top_share = [max(Counter(labels[i] for i in s.train).values()) / len(s.train) for s in shards.values()]
    assert sum(top_share) / len(top_share) > 0.5  # IID would be about 0.25
    again = partition(labels, [f"d{i}" for i in range(8)], cfg, seed=0)
    assert again == shards


def test_more_clients_than_samples():
    with pytest.raises(TestbedError, match="devices: 50 devices need at least 400"):
        partition(list(range(100)), [f"d{i}" for i in range(50)], DataConfig(), seed=0)


def test_impossible_dirichlet_is_explained():
    cfg = DataConfig(partition="dirichlet", alpha=0.01, min_per_client=30)
    with pytest.raises(TestbedError, match="data.alpha"):
        partition([i % 2 for i in range(200)], [f"d{i}" for i in range(6)], cfg, seed=0)


def test_ag_news_sample_loads():
    cfg = DataConfig(source="files", train_file=str(AG_NEWS / "train.csv"), test_file=str(AG_NEWS / "test.csv"),
                     text_columns=["title", "description"], label_column="label", label_offset=1)
    train, test, n = load_splits(cfg, seed=0)
    assert n == 4 and len(train.labels) == 6000 and len(test.labels) == 1600
    assert set(train.labels) == {0, 1, 2, 3} and all(isinstance(t, str) and t for t in train.texts[:50])


def test_file_errors_name_the_culprit(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nhello world,1\nbye,2\n")
    base = dict(source="files", train_file=str(csv), test_file=str(csv))
    with pytest.raises(TestbedError, match=r"data.train_file: file not found: .*nowhere.csv"):
        load_splits(DataConfig(**{**base, "train_file": str(tmp_path / "nowhere.csv")}), 0)
    with pytest.raises(TestbedError, match="data.label_column: column 'topic' not in"):
        load_splits(DataConfig(**base, label_column="topic"), 0)
    with pytest.raises(TestbedError, match="data.text_columns: column 'body'"):
        load_splits(DataConfig(**base, text_columns=["body"]), 0)
    with pytest.raises(TestbedError, match="label_offset"):
        load_splits(DataConfig(**base, label_offset=5), 0)
    txt = tmp_path / "d.txt"
    txt.write_text("hello")
    with pytest.raises(TestbedError, match="unsupported file type"):
        load_splits(DataConfig(**{**base, "train_file": str(txt)}), 0)
