"""Data helpers for Hugging Face ``datasets`` (optional: ``pip install 'fastprocon[trl]'``).

- :func:`with_safety_samples`: the ``_safe`` mix (ProCon_wu_safe): ``k`` harmful-instruction ->
  refusal rows (fastprocon's built-in safety set, or your file) added to your dataset in its
  own row format, then shuffled, as ``fastprocon train``'s ``data.safety_samples``.
- :func:`tokenized_dataset`: rows tokenized exactly as ``fastprocon train`` does (chat-template
  prompt, response through the end-of-turn token) as ``input_ids`` + ``labels`` (-100 on the
  prompt) columns, which TRL's SFTTrainer and its collator take as they are.
"""
from __future__ import annotations

from fastprocon.data.examples import Example, load_examples, mix_examples, resolve_data_path
from fastprocon.data.tokenize import TokenizedExample, tokenize_examples


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise ModuleNotFoundError("this helper needs the datasets package: pip install 'fastprocon[trl]'") from err
    return datasets


def _row(example: Example, columns: list[str], conversational: bool) -> dict:
    user = ([{"role": "system", "content": example.system}] if example.system else []) + \
        [{"role": "user", "content": example.prompt}]
    assistant = [{"role": "assistant", "content": example.response}]
    if "messages" in columns:
        return {"messages": user + assistant}
    if conversational:
        return {"prompt": user, "completion": assistant}
    return {"prompt": example.prompt, "completion": example.response}


def with_safety_samples(dataset, k: int, *, seed: int = 0, safety: str = "safety"):
    """``dataset`` (a ``datasets.Dataset`` with a ``messages`` column, or ``prompt`` and
    ``completion`` columns, conversational or plain text) plus ``k`` rows of ``safety`` (a
    built-in set name or a data file) sampled without replacement by ``seed``, shuffled by
    ``seed``. Columns other than the row format's are None in the added rows."""
    datasets = _datasets()
    columns = list(dataset.column_names)
    if "messages" not in columns and not {"prompt", "completion"} <= set(columns):
        raise ValueError(f"with_safety_samples: the dataset has columns {columns}; expected 'messages' or 'prompt' "
                         "and 'completion' (mix before tokenizing)")
    conversational = "messages" not in columns and len(dataset) > 0 and isinstance(dataset[0]["prompt"], list)
    chosen = mix_examples([], load_examples(resolve_data_path(safety)), k, seed)
    rows = [_row(ex, columns, conversational) for ex in chosen]
    extra = {c: [None] * len(rows) for c in columns if c not in rows[0]} if rows else {}
    added = datasets.Dataset.from_list([{**row, **{c: None for c in extra}} for row in rows])
    if not rows:
        return dataset
    try:
        added = added.cast(dataset.features)
    except (ValueError, TypeError) as err:
        raise ValueError(f"with_safety_samples: cannot give the safety rows the dataset's column types "
                         f"({dataset.features}): {err}") from None
    return datasets.concatenate_datasets([dataset, added]).shuffle(seed=seed)


def tokenized_dataset(examples: list[Example] | str, tokenizer, max_length: int):
    """A ``datasets.Dataset`` of ``input_ids`` and ``labels`` (-100 on the prompt), tokenized as
    ``fastprocon train`` does; ``examples`` is a list of Example or TokenizedExample, or a data
    file / built-in set name."""
    datasets = _datasets()
    if isinstance(examples, str):
        examples = load_examples(resolve_data_path(examples))
    tokenized = examples if examples and isinstance(examples[0], TokenizedExample) else \
        tokenize_examples(examples, tokenizer, max_length)[0]
    return datasets.Dataset.from_dict({"input_ids": [ex.input_ids for ex in tokenized],
                                       "labels": [ex.labels for ex in tokenized]})
