"""Layers resident only when a plan runs them: read from the checkpoint, released for real (RSS)."""
import pytest
import torch

from testbed.agent.trainer import train_plan
from testbed.core.config import LoraConfig, ModelConfig, TrainConfig
from testbed.core.plan import Plan
from testbed.data import Tokens
from testbed.measure.memory import MIB, rss_mb
from testbed.model.info import model_info
from testbed.model.layers import running_layers
from testbed.model.load import load_backbone
from testbed.model.lora import init_lora
from testbed.model.residency import hold, release_freed


def resident(bb) -> dict[int, list[str]]:
    return {l: [c for c, m in layer.named_children() if next(m.parameters()).device.type != "meta"]
            for l, layer in enumerate(bb.layers)}


def test_held_layers_are_exactly_the_checkpoints_and_released_layers_leave_rss(tiny_llama):
    cfg = ModelConfig(name=tiny_llama)
    lazy = load_backbone(cfg, 4, seed=0, resident=False)
    layer_mb = model_info(lazy).layer_params * 4 / MIB
    assert all(children == [] for children in resident(lazy).values())
    release_freed()  # what loading freed goes back first, or new layers would reuse it unseen
    before = rss_mb()
    hold(lazy, list(range(16)))
    held = rss_mb()
    assert held - before > 0.8 * 16 * layer_mb, (before, held, layer_mb)
    full = load_backbone(cfg, 4, seed=0)
    for (name, a), (_, b) in zip(lazy.layers.named_parameters(), full.layers.named_parameters()):
        assert torch.equal(a, b), name
        assert not a.requires_grad
    del full
    release_freed()
    held = rss_mb()
    hold(lazy, [0, 5], {5: "attn"})  # 14 layers and one FFN (2/3 of a layer) go
    assert held - rss_mb() > 0.8 * 14.6 * layer_mb, (held, rss_mb(), layer_mb)  # really freed
    assert resident(lazy)[0] == ["self_attn", "mlp", "input_layernorm", "post_attention_layernorm"]
    assert resident(lazy)[5] == ["self_attn", "input_layernorm"] and resident(lazy)[1] == []


@pytest.mark.parametrize("plan", [Plan(ranks={1: 4}, layers=[1], local_steps=2, batch_size=8),
                                  Plan(ranks={1: 4}, layers=[0, 1], blocks={0: "ffn", 1: "attn"}, local_steps=2,
                                       batch_size=8)])
def test_a_lazy_backbone_trains_a_submodel_bitwise_like_a_resident_one(tiny_bert, plan):
    cfg = ModelConfig(name=tiny_bert, lora=LoraConfig(rank=4, alpha=8))
    full, lazy = load_backbone(cfg, 4, seed=0), load_backbone(cfg, 4, seed=0, resident=False)
    hold(lazy, plan.resident(2), plan.blocks)
    g = torch.Generator().manual_seed(0)
    tokens = Tokens(torch.randint(5, 1000, (16, 8), generator=g), torch.ones(16, 8, dtype=torch.long),
                    torch.randint(0, 4, (16,), generator=g))
    lora = init_lora(model_info(full), plan.adapted(2), 4, seed=0)
    head = {n: p.detach().clone() for n, p in full.head_params().items()}
    a, b = (train_plan(bb, plan, lora, head, tokens, list(range(16)), cfg.lora, TrainConfig(), seed=0)
            for bb in (full, lazy))
    assert a.loss == b.loss and a.footprint_mb == b.footprint_mb
    assert all(torch.equal(a.lora[l][k], b.lora[l][k]) for l in a.lora for k in a.lora[l])


@torch.no_grad()
def test_a_bert_layer_running_one_block_passes_the_stream_through(tiny_bert):
    bb = load_backbone(ModelConfig(name=tiny_bert), 4, seed=0)
    layer, x = bb.layers[1], torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    bb.model.eval()
    attention_out = layer.attention(x)[0]
    with running_layers(bb, [0, 1], {1: "attn"}):
        assert torch.equal(layer(x), attention_out)  # FFN skipped: the stream leaves as attention left it
    with running_layers(bb, [0, 1], {1: "ffn"}):
        assert torch.equal(layer(x), layer.output(layer.intermediate(x), x))  # attention skipped
    assert torch.equal(layer(x), layer.output(layer.intermediate(attention_out), attention_out))  # restored


@torch.no_grad()
def test_a_llama_layer_running_one_block_adds_nothing_for_the_other(tiny_llama):
    """Skipping a block equals zeroing its output projection: the residual passes unchanged."""
    bb = load_backbone(ModelConfig(name=tiny_llama), 4, seed=0)
    bb.model.eval()
    ids = torch.randint(1000, 2000, (2, 6), generator=torch.Generator().manual_seed(0))
    for block, proj in (("ffn", "self_attn.o_proj"), ("attn", "mlp.down_proj")):
        with running_layers(bb, list(range(16)), {3: block}):
            skipped = bb.model(input_ids=ids).logits
        weight = bb.layers[3].get_submodule(proj).weight
        saved = weight.clone()
        weight.zero_()
        zeroed = bb.model(input_ids=ids).logits
        weight.copy_(saved)
        assert torch.allclose(skipped, zeroed, atol=1e-5) and not torch.allclose(skipped, bb.model(input_ids=ids).logits)
