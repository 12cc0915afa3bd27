"""The model: loading, families, LoRA surgery, layer skipping and residency.

Layers keep their original index everywhere (wire, state, logs), whatever subset a
device runs.  LoRA is applied through peft for one plan at a time (per-layer ranks,
``alpha`` scaled with the rank so that ``alpha / rank`` is the same everywhere: a
device's update is ``s * B @ A`` with one ``s``), and removed afterwards, so one
loaded backbone serves every plan.

A layer may run only its attention block or only its FFN block (FedPruner's fine-grained
units): the skipped block's submodules are swapped for stand-ins through which the residual
stream passes unchanged.  An agent's backbone may keep layers off the heap: they live on the
meta device until a plan needs them, are then read from the checkpoint (only the blocks that
run), and are released when a later plan drops them (`hold`).
"""
