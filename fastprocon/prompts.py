"""Prompt batches for forward passes and generation: chat-template encoding, padding, prompt sets."""
from __future__ import annotations

from pathlib import Path

import torch

from fastprocon.data import builtin_path, format_prompt, load_instructions


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt rendered by the chat template with the generation prompt.

    No special tokens are added on top: the template already holds whatever the model expects.
    """
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {i} is empty or not a string: {prompt!r}")
    return [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


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
