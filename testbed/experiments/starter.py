"""The commented starting config `testbed init` writes, in the spirit of `flwr new`: runnable as
written, on generated data or on the user's own file, every key it sets explained beside it."""
from __future__ import annotations

import json

from testbed.core.devices import CLASSES
from testbed.core.options import STRATEGY_OPTIONS

HEAD = """\
# An experiment for `testbed run`, written by `testbed init`. A key left out takes its default;
# every key: docs/config.md. `testbed check {path}` checks it all (files, columns, labels,
# devices) without loading the model; `testbed run {path}` runs it; `--set KEY=VALUE` changes a
# key for one run (e.g. --set rounds=10).

seed: 0                     # seeds the data split, sampling, initial LoRA and training
rounds: 5                   # federated rounds
target_accuracy: 0.8        # the test accuracy at which time_to_target_s is taken
clock: modelled             # modelled: each device is charged what its class would take (deterministic);
                            # wall: real seconds

strategy:
  name: fedlora             # {strategies}
                            # (docs/strategies.md; each strategy's options: docs/config.md)

model:
  name: minilm              # the bundled all-MiniLM-L6-v2, a Hugging Face id or a local directory
  max_length: 32            # tokens per example: longer texts are cut, shorter ones padded
  lora: {{rank: 8, alpha: 16}}

"""

SYNTHETIC = """\
data:
  source: synthetic         # generated topic sentences (offline); for your own data run
                            # `testbed init --data FILE --text COLUMN --label COLUMN`
  synthetic_train: 1600
  synthetic_test: 400
  partition: iid            # iid, or dirichlet: each label split among the devices unevenly (data.alpha)

"""

FILES = """\
data:
  source: files
  train_file: {train}       # relative to the directory you run from
  test_file: {test}{test_note}
  text_columns: {text}      # joined with a space into an example's text
  label_column: {label}
  partition: iid            # iid, or dirichlet: each label split among the devices unevenly (data.alpha)

"""

TAIL = """\
devices:                    # device class: how many; classes: {classes}
  laptop: 2
  jetson-tx2: 2

train:
  local_steps: 10           # optimizer steps each device takes in a round
  batch_size: 16
"""


def starter_config(path: str, data: str = "", test: str = "", text: list[str] = ("text",),
                   label: str = "label") -> str:
    """The config's text: on the synthetic task, or on `data` (tested on `test`, else on `data`
    itself) with the given text and label columns."""
    head = HEAD.format(path=path, strategies=", ".join(STRATEGY_OPTIONS))
    if not data:
        return head + SYNTHETIC + TAIL.format(classes=", ".join(CLASSES))
    note = "" if test else "  # the training file itself: name a held-out file here, or accuracy flatters the model"
    files = FILES.format(train=json.dumps(data), test=json.dumps(test or data), test_note=note,
                         text=json.dumps(list(text)), label=json.dumps(label))
    return head + files + TAIL.format(classes=", ".join(CLASSES))
