"""Tokenising, once per run: classification texts, or causal-LM prompts and responses with their
loss mask; every device then indexes into the same tensors."""
from __future__ import annotations

import torch

from testbed.data.records import Choices, Split, Tokens


def tokenize(tokenizer, split: Split, max_length: int) -> Tokens:
    enc = tokenizer(split.texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return Tokens(enc["input_ids"], enc["attention_mask"], torch.tensor(split.labels, dtype=torch.long))


def tokenize_instructions(tokenizer, split: Split, max_length: int, chat: bool, options: list[str] | None) -> Tokens:
    """Task causal_lm: each row's prompt, then its response and EOS, right-padded to max_length.
    Targets are the response and EOS only: prompt and padding are -100 (no loss).  `chat`: the
    prompt is a user turn of the tokenizer's chat template, the response the assistant's answer.
    `options` (label words, by id): the closed set accuracy chooses from."""
    prompts = prompt_ids(tokenizer, split.texts, chat)
    responses = tokenizer(split.responses, add_special_tokens=False)["input_ids"]
    n = len(prompts)
    ids = torch.full((n, max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    targets = torch.full((n, max_length), -100, dtype=torch.long)
    lengths = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt, response = fit(prompt, response + [tokenizer.eos_token_id], max_length)
        end = len(prompt) + len(response)
        ids[i, :end] = torch.tensor(prompt + response)
        mask[i, :end] = 1
        targets[i, len(prompt):end] = torch.tensor(response)
        lengths.append(len(prompt))
    choices = None
    if options is not None:
        choices = Choices(tokenizer(options, add_special_tokens=False)["input_ids"],
                          torch.tensor(split.labels, dtype=torch.long), torch.tensor(lengths))
    return Tokens(ids, mask, targets, choices)


def prompt_ids(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Each prompt's tokens, as a user turn awaiting the assistant's answer where `chat`."""
    if not chat:
        return tokenizer(prompts)["input_ids"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template holds any special tokens


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """A prompt and response cut to max_length tokens together.  The response keeps its start and
    leaves the prompt at least half; a prompt too long loses its middle, so that its start (the
    instruction, a chat header) and its end (the cue the response follows) stay."""
    response = response[: max_length - min(len(prompt), max_length // 2)]
    room = max_length - len(response)
    if len(prompt) > room:
        prompt = prompt[: room - room // 2] + prompt[len(prompt) - room // 2:]
    return prompt, response
