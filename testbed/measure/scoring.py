"""A causal LM's choice among a closed set of responses: each option's summed log-likelihood
after the prompt, the likeliest taken (how LLM papers report classification and multiple-choice
accuracy)."""
from __future__ import annotations

import torch
from torch import nn

from testbed.data import Choices, Tokens


@torch.no_grad()
def option_logliks(model: nn.Module, prompts: list[list[int]], options: list[list[int]], pad_id: int,
                   batch_size: int) -> torch.Tensor:
    """(prompts, options): log p(option | prompt), summed over the option's tokens.

    Every (prompt, option) pair is one sequence; a batch is left-padded so that all options end
    at the last position and the model computes logits only for the last positions, not for
    every position of its (large) vocabulary.  Position ids skip the padding, so a padded
    sequence scores as it would alone."""
    pairs = [(p, o) for p in prompts for o in options]
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(p) + len(o) for p, o in chunk)
        tail = max(len(o) for _, o in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.full((len(chunk), tail), -1, dtype=torch.long)  # the option's tokens, right-aligned
        for i, (p, o) in enumerate(chunk):
            ids[i, width - len(p) - len(o):] = torch.tensor(p + o)
            mask[i, width - len(p) - len(o):] = 1
            targets[i, tail - len(o):] = torch.tensor(o)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        # The logits at positions width-tail-1 .. width-2 predict the last `tail` tokens.
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=tail + 1).logits
        logp = logits[:, :-1].float().log_softmax(-1)
        picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        scores.append((picked * (targets >= 0)).sum(-1))
    return torch.cat(scores).view(len(prompts), len(options))


def choose(model: nn.Module, tokens: Tokens, idx: list[int], pad_id: int, batch_size: int) -> torch.Tensor:
    """The option each listed row's prompt makes likeliest (by label id)."""
    choices: Choices = tokens.choices
    prompts = [tokens.input_ids[i, : choices.prompt_lengths[i]].tolist() for i in idx]
    return option_logliks(model, prompts, choices.options, pad_id, batch_size).argmax(-1)
