"""Layer discovery and LoRA surgery on tiny random models of every supported family."""
import pytest
import torch
from torch import nn

from testbed.core.config import LoraConfig
from testbed.core.errors import TestbedError
from testbed.model.info import model_info
from testbed.model.layers import running_layers
from testbed.model.lora import (get_head, get_lora, init_lora, lora_applied,
                                set_head, set_lora)
from tests.helpers import FAMILIES, build


def batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(2, 100, (2, 7), generator=g), "attention_mask": torch.ones(2, 7, dtype=torch.long),
            "labels": torch.tensor([0, 2])}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layers_found_and_lora_round_trips_by_original_index(family):
    bb, path = build(family)
    assert bb.layers_path == path and bb.num_layers == 3 and all(bb.modules.values())
    info = model_info(bb)
    ranks = {0: 0, 1: 2, 2: 4}  # layer 0 carries no LoRA, the others differ in rank
    state = init_lora(info, [1, 2], 4, seed=3)
    state[1] = {n: (t[:2] if n.endswith(".A") else t[:, :2]) + 0.01 for n, t in state[1].items()}
    state[2] = {n: t + 0.02 for n, t in state[2].items()}
    originals = {n: type(m) for n, m in bb.model.named_modules()}
    with lora_applied(bb, ranks, LoraConfig(rank=4, alpha=8)) as model:
        set_lora(bb, model, state)
        got = get_lora(bb, model)
        assert sorted(got) == [1, 2]
        for layer in (1, 2):
            for name, tensor in state[layer].items():
                assert torch.equal(got[layer][name], tensor), (layer, name)
        out = model(**batch())
        assert torch.isfinite(out.loss)
    assert {n: type(m) for n, m in bb.model.named_modules()} == originals  # surgery undone


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_running_a_subset_of_layers(family):
    bb, _ = build(family)
    bb.model.eval()
    with torch.no_grad():
        full = bb.model(**batch()).logits
        with running_layers(bb, [0, 2]):
            assert len(bb.layers) == 2
            part = bb.model(**batch()).logits
    assert len(bb.layers) == 3
    assert not torch.allclose(full, part)
    with torch.no_grad():
        assert torch.allclose(bb.model(**batch()).logits, full)


def test_scaling_is_constant_across_ranks():
    """dW = s * B @ A with the same s at every rank: alpha is scaled with the rank."""
    bb, _ = build("bert")
    with lora_applied(bb, {0: 2, 1: 4, 2: 1}, LoraConfig(rank=4, alpha=8)) as model:
        scalings = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {2.0}


def test_state_that_does_not_fit_the_plan_is_refused():
    bb, _ = build("bert")
    info = model_info(bb)
    with lora_applied(bb, {0: 4, 1: 4, 2: 4}, LoraConfig(rank=4, alpha=8)) as model:
        with pytest.raises(TestbedError, match="lacks"):
            set_lora(bb, model, init_lora(info, [0, 1], 4, seed=0))  # layer 2 missing
        bad = init_lora(info, [0, 1, 2], 4, seed=0)
        bad[2]["nonexistent.A"] = torch.zeros(4, 32)
        with pytest.raises(TestbedError, match="does not fit"):
            set_lora(bb, model, bad)


def test_head_get_set():
    bb, _ = build("distilbert")
    head = get_head(bb)
    assert any("classifier" in n for n in head) and not any(n.startswith("distilbert.") for n in head)
    set_head(bb, {n: torch.zeros_like(t) for n, t in head.items()})
    assert all(torch.count_nonzero(t) == 0 for t in get_head(bb).values())
    assert isinstance(bb.model, nn.Module)
