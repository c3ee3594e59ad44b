"""GSM8K task metrics of a model: test cross-entropy and greedy exact-match accuracy.

The CE is computed exactly as the trainer's (``fastprocon.train.loss``): summed over response
tokens and divided by their count, with the same tokenization (chat template, eos-terminated
responses, cut at ``max_length``). Exact match compares the number after ``####`` in the
completion (else its last number) with the reference answer's ``#### <number>``.
"""
from __future__ import annotations

import re

import torch

from fastprocon.data.examples import IGNORE_INDEX, Example
from fastprocon.data.tokenize import collate, tokenize_examples
from fastprocon.models.load import LoadedModel
from fastprocon.refusal.evaluate import greedy_completions
from fastprocon.train.loss import ce_sum, shift_labels

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style text: after the last '####', else the last number
    in the text; commas and a trailing '.0' removed. None when there is no number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail) or _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    value = value.replace(",", "")
    return value[:-2] if value.endswith(".0") else value


@torch.no_grad()
def test_loss(loaded: LoadedModel, examples: list[Example], max_length: int, batch_size: int = 8) -> dict:
    """Mean response-token CE of ``examples`` (teacher forcing) -> {"ce", "n_examples", "n_tokens", "n_dropped"}."""
    tokenized, n_cut = tokenize_examples(examples, loaded.tokenizer, max_length, drop_overlong_prompts=True)
    if not tokenized:
        raise ValueError(f"no test example fits max_length {max_length}")
    device = next(loaded.model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[start:start + batch_size], loaded.tokenizer.pad_token_id)
        targets = shift_labels(batch["labels"])
        count += int((targets != IGNORE_INDEX).sum())
        logits = loaded.model(input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        total += ce_sum(logits, targets.to(device)).double()
    return {"ce": float(total) / max(count, 1), "n_examples": len(tokenized), "n_tokens": count,
            "n_dropped": len(examples) - len(tokenized), "n_truncated": n_cut}


def exact_match(loaded: LoadedModel, examples: list[Example], max_new_tokens: int, batch_size: int = 16) -> dict:
    """Greedy completions of the questions, scored against the '#### <number>' of each reference.

    -> {"accuracy", "n", "completions": [{"prompt", "completion", "predicted", "gold", "correct"}]}
    """
    texts, _ = greedy_completions(loaded, [ex.prompt for ex in examples], max_new_tokens=max_new_tokens,
                        batch_size=batch_size, desc="gsm8k test")
    rows = []
    for ex, text in zip(examples, texts):
        gold, predicted = extract_answer(ex.response), extract_answer(text)
        rows.append({"prompt": ex.prompt, "completion": text, "predicted": predicted, "gold": gold,
                     "correct": predicted is not None and predicted == gold})
    n_correct = sum(row["correct"] for row in rows)
    return {"accuracy": n_correct / len(rows) if rows else None, "n": len(rows), "completions": rows}
