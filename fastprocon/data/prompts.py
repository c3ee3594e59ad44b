"""Prompt batches for forward passes and generation: chat-template encoding, padding, prompt sets."""
from __future__ import annotations

from pathlib import Path

import torch

from fastprocon.data.examples import builtin_path, chat_markup, load_instructions, markup_in
from fastprocon.data.tokenize import format_prompt


def encode_prompts(tokenizer, prompts: list[str], max_tokens: int | None = None,
                   why: str = "the model's context") -> list[list[int]]:
    """Token ids of each prompt rendered by the chat template with the generation prompt.

    No special tokens are added on top: the template already holds whatever the model expects.
    ``max_tokens``: a prompt longer than this is a ValueError naming it (index and first
    characters) and ``why`` the limit is what it is. Prompts are never cut: a cut prompt
    (either end) is another prompt, and its result would pass for the original's.
    """
    markup = chat_markup(tokenizer)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {i} is empty or not a string: {prompt!r}")
        token = markup_in(prompt, markup)
        if token is not None:
            head = " ".join(prompt.split())[:40]
            raise ValueError(f"prompt {i} ({head!r}...) contains the special token {token!r}, which the tokenizer "
                             "would read as chat markup (a turn boundary), not as text; remove it from the prompts")
    encoded = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    if max_tokens is not None:
        for i, ids in enumerate(encoded):
            if len(ids) > max_tokens:
                head = " ".join(prompts[i].split())[:40]
                raise ValueError(f"prompt {i} ({head!r}...) is {len(ids)} tokens with the chat template, more than "
                                 f"the {max_tokens} of {why}; shorten or remove it")
    return encoded


def context_length(model) -> int | None:
    """The model's context length in tokens (its config's max_position_embeddings or an alias),
    or None when the config does not say."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pad_batch(sequences: list[list[int]], pad_id: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T] long, attention_mask [B, T] long), padded on ``side`` ("left"/"right")."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def read_prompts(path: str | None, builtin: str, max_prompts: int = 0, seed: int = 0) -> tuple[list[str], dict]:
    """Instructions from ``path`` (default: the built-in set ``builtin``), and a record of where they came from.

    ``max_prompts`` > 0 keeps a seeded random subset of that size, in file order.
    """
    if max_prompts < 0:
        raise ValueError(f"max_prompts must be >= 0 (0 = all), got {max_prompts}")
    source = Path(path) if path else builtin_path(builtin)
    prompts = load_instructions(source)
    total = len(prompts)
    if 0 < max_prompts < total:
        keep = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_prompts]
        prompts = [prompts[i] for i in sorted(keep.tolist())]
    record = {"file": str(source), "builtin": None if path else builtin, "rows": total, "used": len(prompts),
              "seed": seed if len(prompts) < total else None}
    return prompts, record
