"""Prompts for causal-LM tasks: a template over a row's columns, or Alpaca's."""
from __future__ import annotations

import string

from testbed.core.errors import TestbedError


# Alpaca's two templates (Taori et al., 2023): with an input, and without one.
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def render_prompts(template: str, columns: dict[str, list], where: str) -> list[str]:
    """`template` (data.prompt) filled with each row's columns; 'alpaca': Alpaca's template."""
    rows = len(next(iter(columns.values()), []))
    if template == "alpaca":
        if "instruction" not in columns:
            raise TestbedError(f"data.prompt: alpaca needs a column 'instruction', not in {where} "
                               f"(columns: {', '.join(columns)})")
        inputs = columns.get("input") or [""] * rows
        return [(ALPACA if as_text(x) else ALPACA_NO_INPUT).format(instruction=as_text(i), input=as_text(x))
                for i, x in zip(columns["instruction"], inputs)]
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise TestbedError(f"data.prompt: not a valid template ({exc}); write a literal brace twice") from None
    if missing := sorted(f for f in fields if f not in columns):
        raise TestbedError(f"data.prompt: column {missing[0]!r} not in {where} (columns: {', '.join(columns)})")
    return [template.format_map({f: as_text(columns[f][i]) for f in fields}) for i in range(rows)]


def as_text(value) -> str:
    return "" if value is None else str(value)
