"""What several test modules share (the only module of tests/ they import): paths, the
environment of the processes they start, markers, small builders and finders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (AutoModelForSequenceClassification, BertConfig,
                          DistilBertConfig, GPT2Config, LlamaConfig,
                          Qwen2Config, RobertaConfig)

from launch import lab
from launch.faults.inject import mpi_processes
from testbed.core.config import DataConfig, LoraConfig
from testbed.data import Split, synthetic_topics
from testbed.model.backbone import Backbone
from testbed.model.load import wrap_model

ROOT = Path(__file__).resolve().parent.parent
AG_NEWS = ROOT / "data" / "ag_news"  # the AG News sample shipped with the project
# For the processes a test starts (mpirun refuses root unless told).
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def write_config(folder: Path, raw: dict) -> Path:
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def proxy_rows(seed: int) -> Split:
    """A public proxy set for runs on the synthetic topics: sentences like theirs, generated apart
    from their rows (with another seed)."""
    return synthetic_topics(DataConfig(synthetic_train=24, synthetic_test=10), seed)[0]


def write_proxy(path: Path, seed: int) -> str:
    """proxy_rows(seed) as a file for data.proxy_file (columns text, label)."""
    rows = proxy_rows(seed)
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(rows.texts, rows.labels)))
    return str(path)


def cli(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`testbed ARGS` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=300)


def run_processes(marker: str) -> list[int]:
    """launch.mpi processes whose command line or environment mentions `marker` (a test's tmp path)."""
    return [pid for pid, cmd, env in mpi_processes() if marker.encode() in cmd or marker.encode() in env]


# The emulated lab.

NO_LAB = lab.unavailable()


def lab_test(fn):
    """Marked `lab` (select with -m lab), and skipped with the reason where a lab cannot be built."""
    return pytest.mark.lab(pytest.mark.skipif(bool(NO_LAB), reason=NO_LAB)(fn))


def leftovers(state: lab.LabState, pids: list[int]) -> list[str]:
    """Whatever of the lab still exists."""
    found = [f"namespace {ns}" for ns in state.netns if ns in lab.namespaces()]
    found += [f"link {link}" for link in state.links if lab.link_exists(link)]
    found += [f"cgroup {d}" for h in state.hosts for d in lab.cgroup_dirs(h) if d.exists()]
    found += [f"process {pid}" for pid in pids if lab.alive(pid)]  # a zombie (init may not reap) is not alive
    found += [f"path {p}" for p in [state.dir, state.key_file, state.known_hosts, *state.paths] if Path(p).exists()]
    return found


# Task causal_lm on AG News topics: the prompt and the label words the tiny decoders score.
WORDS = ["politics", "sports", "business", "science"]
LM = {"task": "causal_lm", "data.prompt": "{text} topic :", "data.label_words": WORDS, "model.max_length": 24}

# Tiny random models of every supported family, with the path of their layer list.

SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100)
FAMILIES = {
    "bert": (BertConfig(num_hidden_layers=3, **SMALL), "bert.encoder.layer"),
    "roberta": (RobertaConfig(num_hidden_layers=3, pad_token_id=1, **SMALL), "roberta.encoder.layer"),
    "distilbert": (DistilBertConfig(n_layers=3, dim=32, n_heads=2, hidden_dim=64, vocab_size=100),
                   "distilbert.transformer.layer"),
    "llama": (LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, pad_token_id=0, **SMALL), "model.layers"),
    "qwen2": (Qwen2Config(num_hidden_layers=3, num_key_value_heads=2, pad_token_id=0, **SMALL), "model.layers"),
    "gpt2": (GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, pad_token_id=0), "transformer.h"),
}


def build(family: str) -> tuple[Backbone, str]:
    cfg, path = FAMILIES[family]
    cfg.num_labels = 3
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    return wrap_model(model, None, LoraConfig(rank=4, alpha=8)), path
