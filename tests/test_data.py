"""Data: synthetic topics, partitions, and reading files and hub datasets into labelled splits."""
import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from testbed.core.config import DataConfig, ExperimentConfig, from_dict
from testbed.core.errors import TestbedError
from testbed.data import load_splits, partition, synthetic_topics, write_labels
from testbed.experiments.setup import setup
from testbed.model.tiny import tiny_config
from testbed.server.recorder import data_label
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
    splits = load_splits(cfg, seed=0)
    assert splits.num_labels == 4 and len(splits.train.labels) == 6000 and len(splits.test.labels) == 1600
    assert set(splits.train.labels) == {0, 1, 2, 3} and splits.label_names is None
    assert all(isinstance(t, str) and t for t in splits.train.texts[:50])


def test_file_errors_name_the_culprit(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nhello world,1\nbye,2\n")
    base = dict(source="files", train_file=str(csv), test_file=str(csv))
    with pytest.raises(TestbedError, match=r"data.train_file: file not found: .*nowhere.csv"):
        load_splits(DataConfig(**{**base, "train_file": str(tmp_path / "nowhere.csv")}), 0)
    with pytest.raises(TestbedError, match=r"data.label_column: column 'topic' not in data.train_file \(.*d.csv\) "
                                           r"\(columns: text, label\)"):
        load_splits(DataConfig(**base, label_column="topic"), 0)
    with pytest.raises(TestbedError, match="data.text_columns: column 'body'"):
        load_splits(DataConfig(**base, text_columns=["body"]), 0)
    with pytest.raises(TestbedError, match="label_offset"):
        load_splits(DataConfig(**base, label_offset=5), 0)
    with pytest.raises(TestbedError, match="data.delimiter: '::' is not one character"):
        load_splits(DataConfig(**base, delimiter="::"), 0)
    xml = tmp_path / "d.xml"
    xml.write_text("<hello/>")
    with pytest.raises(TestbedError, match="unsupported file type"):
        load_splits(DataConfig(**{**base, "train_file": str(xml)}), 0)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "hello", "label": 1}\n')
    with pytest.raises(TestbedError, match="data.delimiter: applies to .csv, .tsv and .txt files, not to .*d.jsonl"):
        load_splits(DataConfig(source="files", train_file=str(jsonl), test_file=str(jsonl), delimiter=";"), 0)


# Text a CSV reader would mangle: commas, quotes (one opening a field), a missing-value marker.
TRICKY = ['He said "hi, there", then left', '"Quoted" start, and a comma', 'NA', 'it is 5\'11" tall, "really"']


def write_tsv(path: Path, header: list[str], rows: list[list[str]], sep: str = "\t") -> str:
    path.write_text("".join(sep.join(r) + "\n" for r in [header, *rows]))
    return str(path)


def test_tsv_and_txt_keep_commas_and_quotes_intact(tmp_path):
    rows = [[text, label] for text, label in zip(TRICKY, ["pos", "neg", "pos", "neg"])]
    tsv = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], rows)
    txt = write_tsv(tmp_path / "test.txt", ["sentence", "label"], rows)
    cfg = DataConfig(source="files", train_file=tsv, test_file=txt, text_columns=["sentence"])
    splits = load_splits(cfg, 0)
    assert splits.train.texts == TRICKY and splits.test.texts == TRICKY
    piped = write_tsv(tmp_path / "piped.txt", ["sentence", "label"], rows, sep="|")
    cfg = DataConfig(source="files", train_file=piped, test_file=piped, text_columns=["sentence"], delimiter="|")
    assert load_splits(cfg, 0).train.texts == TRICKY


def test_string_labels_get_ids_sorted_or_in_the_listed_order(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["text", "label"],
                      [["fine", "pos"], ["awful", "neg"], ["so-so", "neutral"], ["great", "pos"]])
    test = write_tsv(tmp_path / "test.tsv", ["text", "label"], [["bad", "neg"], ["good", "pos"]])
    cfg = DataConfig(source="files", train_file=train, test_file=test)
    splits = load_splits(cfg, 0)
    assert splits.label_names == ["neg", "neutral", "pos"] and splits.num_labels == 3
    assert splits.train.labels == [2, 0, 1, 2] and splits.test.labels == [0, 2]
    ordered = load_splits(DataConfig(**{**vars(cfg), "labels": ["pos", "neutral", "neg"]}), 0)
    assert ordered.label_names == ["pos", "neutral", "neg"]
    assert ordered.train.labels == [0, 2, 1, 0] and ordered.test.labels == [2, 0]
    with pytest.raises(TestbedError, match=r"data.labels: data.train_file \(.*train.tsv\) has label 'neutral', "
                                           r"which is not among data.labels \(pos, neg\)"):
        load_splits(DataConfig(**{**vars(cfg), "labels": ["pos", "neg"]}), 0)
    with pytest.raises(TestbedError, match="data.label_offset: applies to integer labels only"):
        load_splits(DataConfig(**{**vars(cfg), "label_offset": 1}), 0)
    write_labels(splits.label_names, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["neg", "neutral", "pos"]
    write_labels(splits.label_names, tmp_path / "run")  # a resume with the same labels
    with pytest.raises(TestbedError, match=r"labels.json: the run's labels were \['neg', 'neutral', 'pos'\], "
                                           r"the data now gives \['pos', 'neutral', 'neg'\]"):
        write_labels(ordered.label_names, tmp_path / "run")


def test_a_test_label_the_training_file_never_has_is_refused(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["text", "label"], [["fine", "pos"], ["awful", "neg"]])
    test = write_tsv(tmp_path / "test.tsv", ["text", "label"], [["meh", "neutral"], ["good", "pos"]])
    cfg = DataConfig(source="files", train_file=train, test_file=test)
    with pytest.raises(TestbedError, match=r"data.label_column: data.test_file \(.*test.tsv\) has label 'neutral', "
                                           r"which is not among the training labels \(neg, pos\)"):
        load_splits(cfg, 0)
    ints = write_tsv(tmp_path / "ints.tsv", ["text", "label"], [["fine", "1"], ["awful", "0"]])
    with pytest.raises(TestbedError, match="has label 'neutral', not an integer"):
        load_splits(DataConfig(source="files", train_file=ints, test_file=test), 0)


def test_each_file_has_its_own_columns(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [["fine", "1"], ["awful", "0"]])
    test = write_tsv(tmp_path / "test.tsv", ["id", "content", "polarity"], [["7", "good", "1"]])
    cfg = DataConfig(source="files", train_file=train, test_file=test, text_columns=["sentence"])
    with pytest.raises(TestbedError, match=r"data.text_columns: column 'sentence' not in data.test_file "
                                           r"\(.*test.tsv\) \(columns: id, content, polarity\)"):
        load_splits(cfg, 0)
    with pytest.raises(TestbedError, match=r"data.test_label_column: column 'label ' not in data.test_file"):
        load_splits(DataConfig(**{**vars(cfg), "test_text_columns": ["content"], "test_label_column": "label "}), 0)
    splits = load_splits(DataConfig(**{**vars(cfg), "test_text_columns": ["content"],
                                       "test_label_column": "polarity"}), 0)
    assert splits.train.texts == ["fine", "awful"] and splits.test.texts == ["good"] and splits.test.labels == [1]


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch) -> Path:
    """A dataset directory as `datasets.load_dataset` reads it: two configurations, each with train,
    validation and a test split without labels (-1, as GLUE's), declared in the README's YAML header.
    Cached under tmp_path: datasets would otherwise keep it in the user's cache under its name."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "suite"
    header = ["---", "configs:"]
    for config, words in (("sst2", ["fine film", "awful film"]), ("cola", ["the cat sat", "cat the sat"])):
        header += [f"- config_name: {config}", "  data_files:"]
        for split, labels in (("train", [1, 0]), ("validation", [0, 1]), ("test", [-1, -1])):
            header += [f"  - split: {split}", f"    path: {config}/{split}.csv"]
            (folder / config).mkdir(parents=True, exist_ok=True)
            rows = "".join(f"{w},{y}\n" for w, y in zip(words, labels))
            (folder / config / f"{split}.csv").write_text("sentence,label\n" + rows)
    (folder / "README.md").write_text("\n".join([*header, "---", ""]))
    return folder


def test_a_hub_dataset_with_a_configuration_and_a_validation_split(hub_dataset):
    cfg = DataConfig(source="hub", hub_name=str(hub_dataset), hub_config="cola",
                     text_columns=["sentence"], test_split="validation")
    splits = load_splits(cfg, 0)
    assert splits.train.texts == ["the cat sat", "cat the sat"] and splits.train.labels == [1, 0]
    assert splits.test.labels == [0, 1] and splits.num_labels == 2
    assert data_label(ExperimentConfig(data=cfg)) == f"{hub_dataset}/cola (iid)"  # the summary's name for it
    with pytest.raises(TestbedError, match=r"data.test_split: no split 'dev' in .* \(splits: train, validation, "
                                           r"test\)"):
        load_splits(DataConfig(**{**vars(cfg), "test_split": "dev"}), 0)
    with pytest.raises(TestbedError, match=r"data.hub_name: cannot load .* \(configuration 'mnli'\)"):
        load_splits(DataConfig(**{**vars(cfg), "hub_config": "mnli"}), 0)


def test_a_test_split_without_labels_is_refused_with_a_hint(hub_dataset):
    cfg = DataConfig(source="hub", hub_name=str(hub_dataset), hub_config="sst2",
                     text_columns=["sentence"])
    with pytest.raises(TestbedError, match=r"data.test_split: .*suite\[test\] has no labels \(every label is -1\); "
                                           r"use data.test_split: validation"):
        load_splits(cfg, 0)


def test_a_dataset_not_in_the_cache_fails_at_once_offline():
    with pytest.raises(TestbedError, match="data.hub_name: 'no-such-org/no-such-set' is not in the local cache.*"
                                           "HF_HUB_OFFLINE=0"):
        load_splits(DataConfig(source="hub", hub_name="no-such-org/no-such-set"), 0)


def test_the_data_is_checked_before_the_model_loads(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["text", "label"], [["fine", "pos"], ["awful", "neg"]] * 20)
    test = write_tsv(tmp_path / "test.tsv", ["text", "label"], [["meh", "neutral"]])
    raw = tiny_config("no-such-org/no-such-model", **{"data": {"source": "files", "train_file": train,
                                                               "test_file": test}})
    with pytest.raises(TestbedError, match="data.label_column: .* has label 'neutral'"):
        setup(from_dict(raw))
