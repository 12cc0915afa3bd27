"""Which layers an agent's backbone holds in memory: read from its checkpoint when a plan runs them, released when none does."""
from __future__ import annotations

import ctypes
import ctypes.util

from testbed.core.errors import TestbedError
from testbed.core.plan import BOTH
from testbed.model.backbone import Backbone
from testbed.model.layers import running_children


def hold(bb: Backbone, layers: list[int], blocks: dict[int, str] | None = None) -> None:
    """Make exactly these layers resident (per layer only the blocks that run) and release the
    rest.  A backbone without a store holds every layer already: nothing to do."""
    if bb.store is None:
        return
    want = {l: set(running_children(bb, l, (blocks or {}).get(l, BOTH))) for l in layers}
    load, released = {}, False
    for l, layer in enumerate(bb.layers):
        for child, module in layer.named_children():
            params = list(module.parameters())
            if not params:
                continue
            resident = params[0].device.type != "meta"
            if child in want.get(l, ()) and not resident:
                load[(l, child)] = module
            elif child not in want.get(l, ()) and resident:
                module.to("meta")
                released = True
    if released:
        release_freed()
    for (l, child), module in load.items():  # one child at a time: the transient copy stays small
        prefix = f"{bb.store.prefix}.{l}.{child}."
        tensors = bb.store.read([k for k in bb.store.files if k.startswith(prefix)])
        dtype = next(module.parameters()).dtype
        try:
            # A copy: safetensors' tensors alias a mapping of the whole file, which must not outlive the read.
            module.load_state_dict({k[len(prefix):]: t.to(bb.placement.device, dtype, copy=True)
                                    for k, t in tensors.items()},
                                   strict=True, assign=True)
        except RuntimeError as exc:
            raise TestbedError(f"model: the checkpoint does not fit layer {l}'s {child}: "
                               f"{str(exc).splitlines()[0]}") from None
        module.requires_grad_(False)

def release_freed() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so RSS falls."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
