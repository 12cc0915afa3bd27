"""Data: loading (hub, local files, synthetic), labels as ids, prompts and responses (causal-LM
tasks), partitioning across devices, tokenisation.

`records` (the dataclasses that cross modules), `load` (both splits of a run, checked), `sources`
(files and hub splits into tables), `labels`, `prompts`, `synthetic`, `shards` (per device) and
`tokens` (tokenising, once per run: every device then indexes into the same tensors).
"""
from testbed.data.labels import write_labels
from testbed.data.load import load_splits
from testbed.data.records import Choices, Dataset, Shard, Split, Splits, Table, Tokens
from testbed.data.shards import partition
from testbed.data.synthetic import synthetic_topics
from testbed.data.tokens import fit, prompt_ids, tokenize, tokenize_instructions

__all__ = ["Choices", "Dataset", "Shard", "Split", "Splits", "Table", "Tokens", "fit", "load_splits", "partition",
           "prompt_ids", "synthetic_topics", "tokenize", "tokenize_instructions", "write_labels"]
