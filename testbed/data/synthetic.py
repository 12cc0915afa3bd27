"""The built-in synthetic topic-classification task (offline)."""
from __future__ import annotations

import random

from testbed.core.config import DataConfig
from testbed.data.prompts import render_prompts
from testbed.data.records import Split


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
        texts = [sentence(y) for y in labels]
        return Split(render_prompts(cfg.prompt, {"text": texts}, "the synthetic data") if cfg.prompt else texts, labels)

    return split(cfg.synthetic_train), split(cfg.synthetic_test)
