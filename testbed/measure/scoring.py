"""A causal LM's choice among a closed set of responses: each option's summed log-likelihood
after the prompt, the likeliest taken (how LLM papers report classification and multiple-choice
accuracy)."""
from __future__ import annotations

import torch
from torch import nn

from testbed.data import Choices, Tokens


@torch.no_grad()
def option_logliks(model: nn.Module, prompts: list[list[int]], options: list[list[int]], pad_id: int,
                   batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(prompts, options): log p(option | prompt), summed over the option's tokens.

    The pair (prompt, option) is scored on the sequence prompt + option[:-1], whose last len(option)
    positions predict the option's tokens.  Pairs sharing that sequence run it once (one-token
    options: one sequence per prompt).  A batch is left-padded, so that every sequence ends at
    the last position and the model computes logits (over its whole vocabulary) only for the
    last few positions; position ids skip the padding, so a sequence scores as it would alone."""
    pairs = [(p, o) for p in prompts for o in options]
    scoring: dict[tuple[int, ...], list[int]] = {}  # input sequence -> the pairs it scores
    for k, (p, o) in enumerate(pairs):
        scoring.setdefault(tuple(p + o[:-1]), []).append(k)
    sequences = list(scoring)
    keep = max(len(o) for o in options)
    scores = torch.zeros(len(pairs))
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep).logits
        logp = logits.float().log_softmax(-1)
        for i, s in enumerate(chunk):
            for k in scoring[s]:
                option = torch.tensor(pairs[k][1], device=logp.device)
                scores[k] = logp[i, -len(option):].gather(-1, option.unsqueeze(-1)).sum()
    return scores.view(len(prompts), len(options))


def choose(model: nn.Module, tokens: Tokens, idx: list[int], pad_id: int, batch_size: int,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """The option each listed row's prompt makes likeliest (by label id)."""
    choices: Choices = tokens.choices
    prompts = [tokens.input_ids[i, : choices.prompt_lengths[i]].tolist() for i in idx]
    return option_logliks(model, prompts, choices.options, pad_id, batch_size, device).argmax(-1)
