"""Running a subset of the layers, or only one block of a layer (original indices everywhere)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from testbed.core.errors import TestbedError
from testbed.core.plan import BOTH
from testbed.model.backbone import Backbone
from testbed.model.families import BLOCKS, _Skip


@contextlib.contextmanager
def running_layers(bb: Backbone, keep: list[int], blocks: dict[int, str] | None = None) -> Iterator[None]:
    """Run only the listed layers (original indices): skipped layers pass their input through.
    `blocks`: per layer, "attn" or "ffn" runs only that block (default: both)."""
    full = bb.layers
    swapped = []  # (layer, child name, original module)
    for l, block in (blocks or {}).items():
        if l in keep and block != BOTH:
            for child, kind in skipped_children(bb, block).items():
                swapped.append((l, child, full[l].get_submodule(child)))
                setattr(full[l], child, _Skip(kind))
    parent_path, _, attr = bb.layers_path.rpartition(".")
    parent = bb.model.get_submodule(parent_path)
    if len(keep) < bb.num_layers:
        setattr(parent, attr, nn.ModuleList([full[i] for i in keep]))
    try:
        yield
    finally:
        setattr(parent, attr, full)
        for l, child, module in swapped:
            setattr(full[l], child, module)

def skipped_children(bb: Backbone, block: str) -> dict[str, str]:
    """The child modules a layer running only `block` skips, with their stand-ins' kinds."""
    if not bb.blocks:
        raise TestbedError(f"model: running only a layer's attention or FFN is not known for model type "
                           f"{bb.model.config.model_type!r} (known: {', '.join(sorted(BLOCKS))})")
    if block not in bb.blocks:
        raise TestbedError(f"plan: unknown block {block!r} (attn, ffn or both)")
    return {c: k for b, children in bb.blocks.items() if b != block for c, k in children.items()}

def running_children(bb: Backbone, layer: int, block: str) -> list[str]:
    """The child modules of a layer that run when it runs `block` (all of them for both)."""
    children = [name for name, _ in bb.layers[layer].named_children()]
    if block == BOTH:
        return children
    return [c for c in children if c not in skipped_children(bb, block)]
