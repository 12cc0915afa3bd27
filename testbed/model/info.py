"""What strategies may know about the model: shapes and counts, no modules."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from testbed.model.backbone import Backbone


@dataclass
class ModelInfo:
    """What strategies may know about the model: no modules, just shapes."""

    num_layers: int
    modules: dict[int, list[str]]
    shapes: dict[str, tuple[int, int]]  # module path inside a layer -> (out, in) of its weight
    scaling: float
    layer_params: int  # parameters in one transformer layer
    other_params: int  # embeddings, final norms and head
    block_params: dict[str, int] = dataclasses.field(default_factory=dict)  # "attn"/"ffn" of one layer; {}: unknown
    module_blocks: dict[str, str | None] = dataclasses.field(default_factory=dict)  # LoRA module -> its block
    task: str = "classification"  # or "causal_lm": the head then runs on every token
    vocab_size: int = 0  # a causal LM's logits per token (0 for classification: a row's few logits)

def model_info(bb: Backbone) -> ModelInfo:
    shapes = {}
    for m in bb.modules[0]:
        w = bb.layers[0].get_submodule(m).weight
        shapes[m] = tuple(w.shape[::-1]) if bb.model.config.model_type == "gpt2" else tuple(w.shape)
    layer_params = sum(p.numel() for p in bb.layers[0].parameters())
    total = sum(p.numel() for p in bb.model.parameters())
    blocks = {b: sum(p.numel() for c in children for p in bb.layers[0].get_submodule(c).parameters())
              for b, children in bb.blocks.items()}
    return ModelInfo(bb.num_layers, bb.modules, shapes, bb.scaling, layer_params,
                     total - layer_params * bb.num_layers, blocks, {m: bb.block_of(m) for m in shapes}, bb.task,
                     bb.model.config.vocab_size if bb.task == "causal_lm" else 0)
