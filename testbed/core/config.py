"""Experiment configuration: YAML files loaded into validated dataclasses.

Every field is typed; range limits live in the field's metadata.  An unknown key, a
wrong type or an out-of-range value raises TestbedError naming the file and the
dotted key, before any work starts.  ``--set a.b=value`` overrides are applied to
the raw mapping first, so they are validated exactly like the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from testbed.core.errors import TestbedError
from testbed.core.options import STRATEGY_OPTIONS, StrategyConfig, option


TASKS = ("classification", "causal_lm")
CAUSAL_LM = "causal_lm"
# The data keys that only a causal-LM task reads.
CAUSAL_LM_KEYS = ("response_column", "label_words")


@dataclass
class LoraConfig:
    """The LoRA adapters.  `alpha / rank` is the scaling every device uses: a layer
    trained at another rank gets its alpha scaled with the rank, so a device's update is always
    `s * B @ A` with the same `s`."""

    rank: int = option(8, lo=1, doc="LoRA rank where a plan does not say otherwise")
    alpha: float = option(16.0, lo=0, doc="scaling numerator; alpha/rank is kept constant across ranks")
    dropout: float = option(0.0, lo=0, hi=1, doc="dropout on the input of the LoRA branch (peft's lora_dropout)")
    targets: list[str] = option(["auto"], doc="module names inside a layer; 'auto' picks per model family")


@dataclass
class ModelConfig:
    """The pretrained model LoRA is added to, and how its inputs are cut."""

    name: str = option("minilm", doc="'minilm' (bundled all-MiniLM-L6-v2), 'smollm2' (bundled SmolLM2-135M-Instruct, "
                                     "a 30-layer LLaMA; converted once into cache_dir), a Hugging Face id or a "
                                     "local path")
    cache_dir: str = option("", doc="where a bundled GGUF model (smollm2) is converted to, once; default: "
                                    "$TESTBED_MODEL_CACHE, else testbed/models in the user's cache directory "
                                    "($XDG_CACHE_HOME or ~/.cache)")
    max_length: int = option(64, lo=4, hi=8192, doc="tokens per example: longer texts are truncated, shorter padded")
    threads: int = option(0, lo=0, doc="torch threads per process; 0 = auto: the cores this process may use "
                                        "(affinity, cgroup CPU quota) that other processes leave free, at least 1; "
                                        "metrics do not depend on it")
    profile: str = option("", doc="DeviceProfile the device classes' speeds are relative to; "
                                  "default: the one shipped for the model, else FLOP counts")
    device: str = option("auto", doc="where the model trains and evaluates: auto (CUDA where the process sees "
                                     "a CUDA device, else the CPU), cpu, cuda, cuda:N or mps; an inventory's "
                                     "testbed_device overrides it per host")
    dtype: str = option("float32", choices=("float32", "bfloat16", "float16"),
                        doc="the dtype the frozen base model is held in (a half one needs a half train.precision); "
                            "LoRA factors and the head stay float32")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    """What is trained and tested on, and how the training rows are split among the devices
    (each device keeps a validation split of its own shard).

    Local files (`source: files`) are read by extension: `.csv`; `.tsv` and `.txt`, tab-separated
    text read exactly as written (no quoting: quotes and commas are text); `.json`, `.jsonl`;
    `.parquet`. Each has a header row or field names. Integer labels are class ids (less
    `label_offset`); any other labels (`pos`, `neg`) get ids in the order `labels` lists them,
    else in sorted order of the training labels, and the run prints them and keeps them in
    `labels.json`. A test label the training data never has is refused. Files, columns and labels
    are checked before the model loads.

    `proxy_file` is public data the server holds, apart from the devices' rows: a server-side probe
    (FedPruner's `cka: server`; `adaptive` on a memory-starved device) reads it and nothing else.
    It is read like `train_file` (the same columns, labels as the training data's ids), and a row
    that is also a row of the training or test data (in the run's sample or not) is refused."""

    source: str = option("synthetic", choices=("synthetic", "files", "hub"),
                         doc="generated topic sentences (offline), local files, or a dataset on the Hugging Face hub")
    hub_name: str = option("", doc="dataset name on the hub, or a local dataset directory (source: hub); read "
                                   "from the local cache unless HF_HUB_OFFLINE=0")
    hub_config: str = option("", doc="the dataset's configuration (subset), e.g. 'sst2' of 'glue' (source: hub)")
    train_split: str = option("train", doc="split trained on (source: hub)")
    test_split: str = option("test", doc="split tested on (source: hub); 'validation' where the test split "
                                         "carries no labels (all -1, as in GLUE)")
    train_file: str = option("", doc="CSV, TSV, TXT, JSON, JSONL or Parquet file, relative to the working "
                                     "directory (source: files)")
    test_file: str = option("", doc="CSV, TSV, TXT, JSON, JSONL or Parquet file, relative to the working "
                                    "directory (source: files)")
    proxy_file: str = option("", doc="the server's public proxy set, which server-side probes run on: a file "
                                     "read like train_file, whatever the source; default: none (the server "
                                     "then reads no rows)")
    delimiter: str = option("", doc="field separator of .csv, .tsv and .txt files, one character ('\\t' for a "
                                    "tab); default: ',' for .csv, a tab for .tsv and .txt")
    text_columns: list[str] = option(["text"], doc="columns that make an example's text, joined with a space")
    label_column: str = option("label", doc="column of class labels: integers, or strings such as 'pos'")
    test_text_columns: list[str] = option([], doc="the test file's (or split's) text columns; default: "
                                                  "text_columns")
    test_label_column: str = option("", doc="the test file's (or split's) label column; default: label_column")
    labels: list[str] = option([], doc="the label values in id order (id 0 first); default: integer labels as "
                                       "they are, others sorted")
    label_offset: int = option(0, doc="subtracted from every integer label (1 for 1-based labels)")
    prompt: str = option("", doc="each row's text as a template over the data's columns, each named in braces "
                                 "(\"Classify the topic.\\n{title} {description}\\nTopic:\"; the synthetic data's "
                                 "column is text); 'alpaca': the Alpaca instruction template over the columns "
                                 "instruction and input (which may be empty); default: text_columns joined. With "
                                 "task causal_lm, the prompt the response follows")
    response_column: str = option("", doc="task causal_lm: the column holding each row's response (free text; "
                                          "no accuracy is reported); default: the label word of the row's label, or "
                                          "'output' where prompt is alpaca")
    label_words: list[str] = option([], doc="task causal_lm: the response of each label, in id order (appended to "
                                            "the prompt as written: mind a leading space); the closed set test "
                                            "accuracy chooses from; default: the names of string labels")
    chat: bool = option(True, doc="task causal_lm: the prompt is a user turn and the response the assistant's, in "
                                  "the tokenizer's chat template (a tokenizer without one: plain text)")
    max_train: int = option(0, lo=0, doc="training rows used, a seeded sample; 0 = all rows")
    max_test: int = option(0, lo=0, doc="test rows used, a seeded sample; 0 = all rows")
    partition: str = option("iid", choices=("iid", "dirichlet"),
                           doc="training rows split evenly at random, or by label skew: each class split among "
                               "the devices in Dirichlet(alpha) proportions")
    alpha: float = option(0.5, gt=0, doc="Dirichlet concentration (partition: dirichlet)")
    min_per_client: int = option(8, lo=1, doc="the fewest training rows a device's shard may hold")
    val_fraction: float = option(0.1, lo=0, hi=0.9, doc="share of each device's shard kept as its validation split")
    synthetic_train: int = option(2000, lo=10, doc="training examples generated (source: synthetic)")
    synthetic_test: int = option(400, lo=10, doc="test examples generated (source: synthetic)")
    synthetic_classes: int = option(4, lo=2, hi=8, doc="topics to tell apart (source: synthetic)")


# `train.lr: auto`, by model.name: the learning rate bench/lr.py measured as best for LoRA on the model
# (docs/benchmarks.md, "Learning rate").  A model not measured gets FALLBACK_LR, a cautious value.
MEASURED_LR = {"minilm": 4e-3, "smollm2": 4e-3}
FALLBACK_LR = 5e-4


def default_lr(model_name: str) -> float:
    return MEASURED_LR.get(model_name, FALLBACK_LR)


@dataclass
class TrainConfig:
    """Each device's local training in a round, and evaluation."""

    local_steps: int = option(10, lo=1, doc="optimizer steps each device takes in a round")
    batch_size: int = option(16, lo=1, doc="training examples per step")
    lr: float | Literal["auto"] = option(
        "auto", lo=0, doc="learning rate of each device's AdamW; auto: the one measured for the model ("
                          + ", ".join(f"{m}: {v:g}" for m, v in MEASURED_LR.items())
                          + f"; docs/benchmarks.md), {FALLBACK_LR:g} for any other; the run's config.yaml "
                            "records the number")
    weight_decay: float = option(0.0, lo=0, doc="AdamW weight decay")
    precision: str = option("fp32", choices=("fp32", "bf16", "fp16"),
                            doc="forward passes under autocast to bfloat16 or float16 (fp16 with a gradient "
                                "scaler), in training and evaluation; an error names the device where torch "
                                "cannot")
    eval_batch_size: int = option(64, lo=1, doc="examples per batch when the global model is evaluated")


@dataclass
class DeviceSpec:
    """`devices`: the device mix, device class to count, e.g. `{jetson-tx2: 4, xavier-nx: 3, agx-orin: 1}`
    (`CLASS: N` is short for `CLASS: {count: N}`), giving devices named CLASS-0, CLASS-1, ...  A class
    may be `{count, memory_mb, speed}` to override its budget and speed; a key with `device_class: CLASS`
    names one device (`testbed deploy` names devices after hosts this way)."""

    count: int = option(1, lo=1, doc="devices of this class")
    memory_mb: float = option(0.0, lo=0, doc="training memory budget in MiB; 0 = the class default")
    speed: float = option(0.0, lo=0, doc="compute speed relative to the reference; 0 = the class default")
    device_class: str = option("", doc="set: the key names one device (a host), of this class")
    profile: str = option("", doc="a DeviceProfile measured on this device (`testbed profile`): its speed, "
                                  "relative to the run's reference profile, and its link replace the class's")


@dataclass
class WireConfig:
    """How plans and updates travel, in-process too."""

    dtype: str = option("float32", choices=("float32", "float16", "bfloat16"),
                      doc="floating-point type LoRA tensors travel in")


@dataclass
class DistConfig:
    """Distributed runs (mpirun, torchrun, `testbed deploy`); an in-process run ignores it."""

    backend: str = option("gloo", choices=("gloo", "nccl"), doc="torch.distributed backend (gloo on CPU)")
    deadline_s: float = option(600.0, gt=0, doc="a device that has not answered by then is left out of the round")
    ifname: str = option("", doc="network interface for torch.distributed (sets GLOO_SOCKET_IFNAME)")
    master_addr: str = option("", doc="rendezvous address of rank 0; default: its address on ifname, or loopback")
    master_port: int = option(0, lo=0, hi=65535, doc="0 = a free port chosen by rank 0")
    threads: int = option(1, lo=0, doc="torch threads per rank, in place of model.threads (ranks usually share "
                                       "cores, and a rank's auto does not see the ranks starting beside it); "
                                       "0 = model.threads")
    profile: bool = option(True, doc="each agent profiles its device when it joins (about 8 s for MiniLM)")


@dataclass
class ExperimentConfig:
    """The top level of an experiment file: the run's own keys, then one section per concern."""

    seed: int = option(0, doc="seeds data splits, sampling, initial LoRA and training")
    task: str = option("classification", choices=TASKS,
                       doc="classification: a fresh head on the model predicts each row's label; causal_lm: the "
                           "model's own language-model head learns each row's response to its prompt (the loss on "
                           "response tokens only); test loss and perplexity, and accuracy where responses are label "
                           "words (the likeliest word is the answer)")
    rounds: int = option(5, lo=1, doc="federated rounds")
    eval_every: int = option(1, lo=1, doc="evaluate the global model every k rounds, and after the last")
    target_accuracy: float = option(0.8, lo=0, hi=1, doc="the test accuracy at which time_to_target_s and "
                                                         "rounds_to_target are taken")
    clock: str = option("modelled", choices=("modelled", "wall"),
                        doc="modelled: each device is charged what the cost model predicts for its class and plan, "
                            "a round lasts as long as its slowest device (deterministic); wall: real seconds")
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    devices: dict[str, DeviceSpec] = field(default_factory=lambda: {"reference": DeviceSpec(count=4)})
    train: TrainConfig = field(default_factory=TrainConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        # Resolved here, as the config is read, so that everything after (plans, the run's config.yaml,
        # resume and compare checks) sees the number, and a resume refuses a default that has changed.
        if self.train.lr == "auto":
            self.train = dataclasses.replace(self.train, lr=default_lr(self.model.name))


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    path = Path(path)
    raw = read_mapping(path, "config")
    for item in overrides:
        apply_override(raw, item, path)
    return from_dict(raw, str(path))


def read_mapping(path: Path, what: str) -> dict:
    """A YAML file whose top level is a mapping (`what` names the kind of file in errors)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise TestbedError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TestbedError(f"{path}: cannot read {what}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TestbedError(f"{path}: not valid YAML{where}: {problem}") from None
    except ValueError as exc:  # PyYAML's own number parsing, e.g. of `0b_`
        raise TestbedError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise TestbedError(f"{path}: expected a mapping of keys at the top level")
    return raw


def from_dict(raw: dict, source: str = "<config>") -> ExperimentConfig:
    """Validate a raw mapping; the strategy's section against that strategy's own options."""
    rest = {k: v for k, v in raw.items() if k != "strategy"}
    strategy = raw.get("strategy") or {}
    cfg = _build(ExperimentConfig, rest, "", source)
    name = strategy.get("name", StrategyConfig.name) if isinstance(strategy, dict) else StrategyConfig.name
    if not isinstance(name, str):
        raise TestbedError(f"{source}: strategy.name: expected str, got {name!r}")
    cfg.strategy = _build(_strategy_options(name, source), strategy, "strategy", source)
    if cfg.task != CAUSAL_LM:
        for key in CAUSAL_LM_KEYS:
            if getattr(cfg.data, key):
                raise TestbedError(f"{source}: data.{key}: applies to task causal_lm, not {cfg.task}")
    if cfg.model.dtype != "float32" and cfg.train.precision == "fp32":  # fp32 inputs cannot meet half weights
        raise TestbedError(f"{source}: model.dtype: a {cfg.model.dtype} base runs under a half train.precision "
                           "(bf16 or fp16), not fp32")
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _strategy_options(name: str, source: str) -> type:
    if name not in STRATEGY_OPTIONS:
        raise TestbedError(f"{source}: strategy.name: unknown strategy {name!r}{did_you_mean(name, STRATEGY_OPTIONS)} "
                           f"(known: {', '.join(sorted(STRATEGY_OPTIONS))})")
    return STRATEGY_OPTIONS[name]


def apply_override(raw: dict, item: str, source: str | Path) -> None:
    """Apply one `--set KEY=VALUE` (VALUE read as YAML) to a raw config mapping."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise TestbedError(f"--set {item!r}: expected KEY=VALUE, for example train.lr=1e-3")
    try:
        parsed = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError):  # ValueError: PyYAML's number parsing, e.g. of `0b_`
        parsed = value
    set_dotted(raw, key, parsed, f"--set {item!r}", source)


def set_dotted(raw: dict, key: str, value: Any, what: str, source: str | Path) -> None:
    """raw[a][b][c] = value for key 'a.b.c', creating the mappings on the way."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TestbedError(f"{what}: {part} is not a mapping in {source}")
    node[parts[-1]] = value


def first_difference(a: object, b: object, path: str = "") -> str | None:
    """The first dotted key at which two nested mappings differ (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if found := first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k)):
                return found
        return None
    return None if a == b else path


def difference_but_rounds(cfg: ExperimentConfig, saved: ExperimentConfig) -> str | None:
    """Where a run's saved config differs from cfg in anything but `rounds` (which a resume may extend)."""
    a, b = to_dict(saved), to_dict(cfg)
    a["rounds"] = b["rounds"]
    return first_difference(a, b)


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TestbedError(f"{source}: {prefix or 'top level'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise TestbedError(f"{source}: {_dot(prefix, str(key))}: unknown key{did_you_mean(str(key), known)} "
                               f"(known: {', '.join(known)})")
    values = {}
    for name, f in known.items():
        if name in raw:
            values[name] = _convert(hints[name], raw[name], _dot(prefix, name), source, f.metadata)
    return cls(**values)


def _convert(tp: Any, value: Any, key: str, source: str, meta: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if tp is DeviceSpec and isinstance(value, int) and not isinstance(value, bool):
            value = {"count": value}  # `jetson-tx2: 4` is short for `{count: 4}`
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        if isinstance(value, str) and value in words:  # a word the field takes besides its type: `lr: auto`
            return value
        base = next(a for a in args if typing.get_origin(a) is not Literal)
        return _convert(base, value, key, source, {**(meta or {}), "words": words})
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise TestbedError(f"{source}: {key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}[{i}]", source, {}) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TestbedError(f"{source}: {key}: expected a mapping, got {value!r}")
        ktp, vtp = typing.get_args(tp)
        return {_convert(ktp, k, key, source, {}): _convert(vtp, v, f"{key}.{k}", source, {})
                for k, v in value.items()}
    return _check_scalar(tp, value, key, source, meta or {})


def _check_scalar(tp: type, value: Any, key: str, source: str, meta: Any) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):
        try:
            value = float(value)  # YAML reads 5e-4 (no dot) as a string
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        expected = " or ".join([tp.__name__, *map(repr, meta.get("words", ()))])
        raise TestbedError(f"{source}: {key}: expected {expected}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise TestbedError(f"{source}: {key}: {value!r} is not a finite number")
    lo, hi, gt, choices = meta.get("lo"), meta.get("hi"), meta.get("gt"), meta.get("choices")
    if gt is not None and value <= gt:
        raise TestbedError(f"{source}: {key}: {value!r} must be greater than {gt}")
    if lo is not None and value < lo:
        raise TestbedError(f"{source}: {key}: {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise TestbedError(f"{source}: {key}: {value!r} is above the maximum {hi}")
    if choices and value not in choices:
        raise TestbedError(f"{source}: {key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def did_you_mean(name: str, known: typing.Iterable[str]) -> str:
    """`; did you mean `lr`?` for the known name closest to a misspelt one, if one is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def _dot(prefix: str, name: str) -> str:
    name = name if name.isprintable() else repr(name)  # an error stays one readable line
    return f"{prefix}.{name}" if prefix else name


def check_same_experiment(cfg: ExperimentConfig, saved_path: Path) -> None:
    """A resumed run must be the same experiment; only `rounds` may change (to extend it)."""
    if not saved_path.is_file():
        raise TestbedError(f"--resume: {saved_path} not found: not a run directory")
    if key := difference_but_rounds(cfg, load_config(saved_path)):
        raise TestbedError(f"--resume: {key} differs from the run's {saved_path} (only rounds may change)")
