"""Tokenization: the chat template, response-only labels, padding into batches, content hashes.

Tokenized layout: ``chat_template(prompt, add_generation_prompt=True)`` tokens, then the
response tokens up to and including the end-of-turn (eos) token; labels are -100 on the prompt.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from fastprocon.data.examples import IGNORE_INDEX, Example, chat_markup, markup_in

logger = logging.getLogger(__name__)


@dataclass
class TokenizedExample:
    id: str
    input_ids: list[int]
    labels: list[int]            # IGNORE_INDEX on prompt tokens, token id on response tokens


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _messages(prompt: str, system: str | None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": prompt}]


def format_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The chat-template rendering of one user turn, ending with the assistant header."""
    return tokenizer.apply_chat_template(_messages(prompt, system), tokenize=False, add_generation_prompt=True)


def _response_text(tokenizer, example: Example, prompt_text: str) -> str:
    full = tokenizer.apply_chat_template(
        _messages(example.prompt, example.system) + [{"role": "assistant", "content": example.response}],
        tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError(f"example {example.id}: the chat template's full conversation does not start with its "
                         "generation prompt; cannot separate prompt and response tokens")
    return full[len(prompt_text):]


def tokenize_examples(examples: list[Example], tokenizer, max_length: int, *,
                      drop_overlong_prompts: bool = False) -> tuple[list[TokenizedExample], int]:
    """Tokenize ``examples`` as prompt (generation prompt included) + response + end-of-turn.

    The prompt and the response are tokenized separately (so the prompt tokens are exactly what
    generation sees). The response tokens end at the tokenizer's eos (the end-of-turn token of
    ChatML-style templates; appended when the template emits none); what the template writes
    after it is not trained on. Sequences longer than ``max_length`` lose tokens from the right;
    the number of such examples is returned. An example whose prompt alone fills ``max_length``
    (no response token left) is an error, or dropped when ``drop_overlong_prompts`` (the dropped
    count is ``len(examples) - len(result)``, also logged).
    -> (list of TokenizedExample, number truncated)
    """
    out, n_truncated, overlong = tokenize_chunk(examples, tokenizer, max_length)
    check_overlong(overlong, max_length, drop_overlong_prompts)
    return out, n_truncated


def tokenize_chunk(examples: list[Example], tokenizer,
                   max_length: int) -> tuple[list[TokenizedExample], int, list[str]]:
    """:func:`tokenize_examples` without the over-long prompt decision (so a large set can go
    through in chunks): -> (kept examples, number truncated, over-long prompts described)."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: cannot mark the end of a response")
    markup = chat_markup(tokenizer)
    for ex in examples:    # the loaders name file and line; this also covers examples made in code
        for field_name, text in (("system message", ex.system), ("prompt", ex.prompt), ("response", ex.response)):
            token = markup_in(text, markup)
            if token is not None:
                raise ValueError(f"example {ex.id}: the {field_name} contains the special token {token!r}, which "
                                 "the tokenizer would read as chat markup (a turn boundary), not as text; remove it")
    prompts = [format_prompt(tokenizer, ex.prompt, ex.system) for ex in examples]
    responses = [_response_text(tokenizer, ex, p) for ex, p in zip(examples, prompts)]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if examples else []
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if examples else []

    out, n_truncated, overlong = [], 0, []
    for ex, p_ids, r_ids in zip(examples, prompt_ids, response_ids):
        r_ids = r_ids[:r_ids.index(eos) + 1] if eos in r_ids else r_ids + [eos]
        if len(p_ids) >= max_length:
            overlong.append(f"{ex.id} ({len(p_ids)} prompt tokens)")
            continue
        input_ids = (p_ids + r_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_length]
        n_truncated += len(p_ids) + len(r_ids) > max_length
        out.append(TokenizedExample(ex.id, input_ids, labels))
    return out, n_truncated, overlong


def check_overlong(overlong: list[str], max_length: int, drop_overlong_prompts: bool) -> None:
    """Raise ValueError for prompts that fill ``max_length`` (from :func:`tokenize_chunk`), or log
    them as dropped when ``drop_overlong_prompts``."""
    if not overlong:
        return
    message = (f"{len(overlong)} example(s) have prompts of >= max_length={max_length} tokens, leaving no "
               f"response token: {', '.join(overlong[:5])}{' ...' if len(overlong) > 5 else ''}")
    if not drop_overlong_prompts:
        raise ValueError(message + "; raise max_length or drop them (drop_overlong_prompts=True; trainer config "
                         "data.drop_overlong_prompts = true; `fastprocon reference --drop-overlong-prompts`)")
    logger.warning("dropped %s", message)


def collate(batch: list[TokenizedExample], pad_id: int) -> dict:
    """Right-pad a batch to its longest sequence.

    -> dict(input_ids [B, T] long, attention_mask [B, T] long (1 = real token),
            labels [B, T] long (IGNORE_INDEX on prompt and padding), ids list[str])
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if not isinstance(pad_id, int):
        raise TypeError(f"pad_id must be an int, got {type(pad_id).__name__}")
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "ids": [ex.id for ex in batch]}


def dataset_hash(tokenized: list[TokenizedExample]) -> str:
    """sha256 hex over (id, input_ids, labels) of every example, taken in id order, so the hash
    names the content of the set, not the order a shuffle left it in. (A
    :class:`fastprocon.data.cache.TokenizedDataset` has it as ``.hash``.)"""
    return hash_sorted_examples(sorted(tokenized, key=lambda e: e.id))


def hash_sorted_examples(examples: Iterable[TokenizedExample]) -> str:
    """:func:`dataset_hash` of examples already in id order (streamed: one at a time)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex.id.encode() + b"\0")
        digest.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes() + b"\1")
        digest.update(np.asarray(ex.labels, dtype=np.int64).tobytes() + b"\2")
    return digest.hexdigest()
