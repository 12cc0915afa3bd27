"""LoRA target defaults: peft's table first, ours only where peft has none."""
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

from testbed.model.families import EXTRA_TARGETS, default_targets


def test_peft_decides_where_it_knows_the_family():
    for family in ("bert", "llama", "qwen2", "gpt2", "mistral"):
        assert default_targets(family) == list(PEFT_TARGETS[family])


def test_ours_fill_in_only_where_peft_has_nothing():
    assert not set(EXTRA_TARGETS) & {k for k, v in PEFT_TARGETS.items() if v}
    assert default_targets("distilbert") == ["q_lin", "v_lin"]
    assert default_targets("no-such-family") is None
