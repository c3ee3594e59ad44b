"""Instruction-tuning data: rows in the common formats, loaded and checked, and mixed with safety rows.

Row formats (``.json`` holding a list, or ``.jsonl`` with one object a line), detected per row:

* alpaca   ``{"instruction", "input"?, "output"}``; prompt = instruction, plus "\\n\\n" + input
  when input is non-empty
* chat     ``{"messages": [{"role", "content"}, ...]}``: an optional leading ``system`` message,
  then one ``user`` and one ``assistant`` message. Multi-turn conversations are rejected (the
  ProCon constraint is defined for a single prompt -> response pair).
* prompt/completion ``{"prompt", "completion"}``
* gsm8k    ``{"question", "answer"}``

Sample ids are ``"<file stem>:<sha1(system, prompt, response)[:12]>"``: stable when rows are
reordered, added or removed. Rows with identical content get ``#1``, ``#2``... suffixes in file
order (which of two identical rows gets which suffix is invisible).

Tokenization (chat template, response-only labels, collate): tokenize.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_SETS = {
    "benign": "benign instruction -> response pairs (training demo)",
    "safety": "harmful instruction -> refusal pairs (the safety mix-in)",
    "harmful": "harmful instructions (refusal-direction extraction)",
    "harmless": "harmless instructions (refusal-direction extraction)",
    "harmful_eval": "held-out harmful instructions (refusal evaluation)",
    "harmless_eval": "held-out harmless instructions (over-refusal evaluation)",
}
ROW_FORMATS = ("{instruction, input?, output}", "{messages: [...]}", "{prompt, completion}",
               "{question, answer}")


@dataclass
class Example:
    id: str
    prompt: str                  # the user message text
    response: str                # the assistant message text
    system: str | None = None    # an optional system message (chat rows only)


@dataclass
class LoadReport:
    examples: list[Example]
    n_rows: int                                            # rows read, good and bad
    skipped: list[str] = field(default_factory=list)       # one message per skipped bad row


def builtin_path(name: str) -> Path:
    """Path of a built-in data set (see ``BUILTIN_SETS``), shipped in fastprocon/data/builtin/."""
    if name not in BUILTIN_SETS:
        raise ValueError(f"unknown built-in data set {name!r}; available: {', '.join(BUILTIN_SETS)}")
    return BUILTIN_DIR / f"{name}.json"


def resolve_data_path(spec: str | Path) -> Path:
    """A built-in set name (``"benign"``...) or a file path -> an existing file path."""
    if isinstance(spec, str) and spec in BUILTIN_SETS:
        return builtin_path(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise FileNotFoundError(f"data file {path} is a directory: give a .json or .jsonl file (or a built-in set: "
                                f"{', '.join(BUILTIN_SETS)})")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (or use a built-in set: {', '.join(BUILTIN_SETS)})")
    return path


class _BadRow(ValueError):
    """A row-level problem: skippable with skip_bad_rows."""


def _read_rows(path: Path):
    """Yield (location, row) for each row of a .json list or .jsonl file; an unparsable jsonl line
    yields a ``_BadRow`` as its row. Location is ``"<path> line N"`` (jsonl, 1-based) or
    ``"<path> item [i]"`` (json, 0-based). A file that is not a JSON list raises ValueError.
    """
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; expected .json or .jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        # utf-8-sig: a leading byte-order mark (as some Windows editors write) is not part of the JSON
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from None
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.split("\n"), start=1):   # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            where = f"{path} line {number}"
            yield where, _jsonl_row(line, where)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a .json data file must hold a list of rows, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield f"{path} item [{index}]", row


def _jsonl_row(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return _BadRow(f"{where}: invalid JSON ({err.msg} at column {err.colno})")


def _jsonl_lines(path: Path):
    """Yield (line number, byte offset, text without the newline) of every line of a .jsonl file,
    read one line at a time. Splits, numbers and decodes as :func:`_read_rows` does with the whole
    text (a leading byte-order mark is skipped; a non-UTF-8 byte raises the same message, its
    position counted in the whole file)."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        base = 3 if f.read(3) == b"\xef\xbb\xbf" else 0
        f.seek(base)
        offset = base
        for number, raw in enumerate(f, start=1):     # a binary file splits after b"\n" only, as text.split("\n")
            try:
                line = raw.decode("utf-8")             # with its newline: an error reads as in the whole text
            except UnicodeDecodeError as err:
                start, end = err.start + offset - base, err.end + offset - base
                what = (f"byte 0x{err.object[err.start]:02x} in position {start}" if end == start + 1
                        else f"bytes in position {start}-{end - 1}")
                raise ValueError(f"{path}: not UTF-8 text ('{err.encoding}' codec can't decode {what}: {err.reason}); "
                                 "save it as UTF-8") from None
            yield number, offset, line[:-1] if line.endswith("\n") else line
            offset += len(raw)


class RowScan:
    """The valid rows of a .jsonl file, found by one streamed pass (:func:`scan_jsonl`) that keeps
    16 bytes a row (the line's offset and its id's 48-bit digest), not the rows (32 bytes a row
    with the sorted digests and the "#k" suffix numbers made from them):
    ``examples(rows)`` reads those rows again (as :func:`load_examples_report` would give them,
    ids suffixed the same way), ``has_id`` tells whether one of its ids is a given string."""

    def __init__(self, path: Path, offsets: np.ndarray, keys: np.ndarray, n_rows: int, n_skipped: int,
                 first_skipped: str | None):
        self.path, self.offsets, self.keys = path, offsets, keys
        self.n_rows, self.n_skipped, self.first_skipped = n_rows, n_skipped, first_skipped
        # the k-th earlier row with the same id gets "#k" (as _dedup_ids: within one file an id with a
        # suffix never equals one without, since ids end in 12 hex digits)
        order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[order]
        new = np.ones(len(keys), bool)
        new[1:] = self._sorted_keys[1:] != self._sorted_keys[:-1]
        position = np.arange(len(keys))
        self.occurrence = np.empty(len(keys), np.int64)
        self.occurrence[order] = position - np.maximum.accumulate(np.where(new, position, 0))
        self._id = re.compile(re.escape(path.stem) + r":([0-9a-f]{12})(?:#([1-9][0-9]*))?")

    def __len__(self) -> int:
        return len(self.offsets)

    def has_id(self, candidate: str) -> bool:
        m = self._id.fullmatch(candidate)
        if m is None:
            return False
        key = int(m[1], 16)
        count = np.searchsorted(self._sorted_keys, key, "right") - np.searchsorted(self._sorted_keys, key, "left")
        return int(count) > int(m[2] or 0)

    def examples(self, rows) -> list[Example]:
        """The examples of valid rows ``rows`` (indices, in this order), read from the file."""
        out: list = [None] * len(rows)
        rows = np.asarray(rows, np.int64)
        with open(self.path, "rb") as f:
            for j in np.argsort(self.offsets[rows], kind="stable"):      # read forward through the file
                i = int(rows[j])
                f.seek(int(self.offsets[i]))
                where = f"{self.path} (row {i})"
                try:
                    line = f.readline().decode("utf-8")
                    system, prompt, response = _parse_example_row(_jsonl_row(line.rstrip("\n"), where), where)
                except (UnicodeDecodeError, _BadRow):
                    system = prompt = response = None
                base = _content_id(self.path.stem, system, prompt, response)
                if prompt is None or int(base[-12:], 16) != self.keys[i]:
                    raise ValueError(f"{self.path} changed while it was being read; start again")
                k = int(self.occurrence[i])
                out[j] = Example(base if k == 0 else f"{base}#{k}", prompt, response, system)
        return out


def scan_jsonl(path: str | Path, *, skip_bad_rows: bool = False, markup: tuple[str, ...] = ()) -> RowScan:
    """:func:`load_examples_report` of a .jsonl file, streamed: the same errors (the first bad row
    names the file and line, unless ``skip_bad_rows``; a non-UTF-8 byte anywhere is reported
    first, as when the whole file is decoded at once), but what it keeps is a :class:`RowScan`.
    ``markup``: as :func:`load_examples_report`'s."""
    path = Path(path)
    offsets, keys = array("q"), array("q")
    n_rows, n_skipped, first_skipped = 0, 0, None
    lines = _jsonl_lines(path)
    for number, offset, line in lines:
        if not line.strip():
            continue
        n_rows += 1
        where = f"{path} line {number}"
        try:
            system, prompt, response = _parse_example_row(_jsonl_row(line, where), where, markup)
        except _BadRow as err:
            if not skip_bad_rows:
                for _ in lines:      # the rest is still decoded: a non-UTF-8 byte later wins, as in _read_rows
                    pass
                raise ValueError(str(err)) from None
            n_skipped += 1
            first_skipped = first_skipped or str(err)
            continue
        offsets.append(offset)
        keys.append(int(_content_id(path.stem, system, prompt, response)[-12:], 16))
    if not offsets:
        raise ValueError(f"{path}: no valid rows ({n_rows} read, {n_skipped} bad)")
    return RowScan(path, np.frombuffer(offsets, np.int64), np.frombuffer(keys, np.int64), n_rows, n_skipped,
                   first_skipped)


def _text_field(row: dict, key: str, where: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if key not in row:
        if required:
            raise _BadRow(f"{where}: missing field {key!r} (row has fields {sorted(row)})")
        return ""
    value = row[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _BadRow(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _BadRow(f"{where}: field {key!r} is empty")
    return value


def _parse_chat(messages, where: str) -> tuple[str | None, str, str]:
    if not isinstance(messages, list):
        raise _BadRow(f"{where}: field 'messages' must be a list, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRow(f"{where}: messages[{i}] must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            _text_field(message, key, f"{where} messages[{i}]", allow_empty=key == "content")
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise _BadRow(f"{where}: field 'messages' must be [system?, user, assistant] (single turn), "
                      f"got roles {roles}")
    system = messages[0]["content"] if roles[0] == "system" else None
    for key, message in (("user", messages[-2]), ("assistant", messages[-1])):
        if not message["content"].strip():
            raise _BadRow(f"{where}: the {key} message's 'content' is empty")
    return system, messages[-2]["content"], messages[-1]["content"]


def _parse_example_row(row, where: str, markup: tuple[str, ...] = ()) -> tuple[str | None, str, str]:
    """(system, prompt, response) of one row in any supported format; a field holding one of the
    strings ``markup`` (the tokenizer's special tokens, see :func:`chat_markup`) is a bad row."""
    system, prompt, response = _parse_row_fields(row, where)
    for field_name, text in (("system message", system), ("prompt", prompt), ("response", response)):
        token = markup_in(text, markup)
        if token is not None:
            raise _BadRow(f"{where}: the {field_name} contains the special token {token!r}, which the tokenizer "
                          "would read as chat markup (a turn boundary), not as text; remove it from the data or "
                          "skip such rows (skip_bad_rows)")
    return system, prompt, response


def _parse_row_fields(row, where: str) -> tuple[str | None, str, str]:
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict):
        raise _BadRow(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return _parse_chat(row["messages"], where)
    if "instruction" in row:
        prompt = _text_field(row, "instruction", where)
        extra = _text_field(row, "input", where, required=False, allow_empty=True)
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return None, prompt, _text_field(row, "output", where)
    if "prompt" in row:
        return None, _text_field(row, "prompt", where), _text_field(row, "completion", where)
    if "question" in row:
        return None, _text_field(row, "question", where), _text_field(row, "answer", where)
    raise _BadRow(f"{where}: unrecognised row with fields {sorted(row)}; expected one of {', '.join(ROW_FORMATS)}")


def _content_id(stem: str, system: str | None, prompt: str, response: str) -> str:
    digest = hashlib.sha1(json.dumps([system, prompt, response]).encode()).hexdigest()[:12]
    return f"{stem}:{digest}"


def _dedup_ids(examples: list[Example]) -> list[Example]:
    """Suffix repeated ids with #1, #2... in list order so every id is unique."""
    used: set[str] = set()
    out = []
    for ex in examples:
        candidate, count = ex.id, 0
        while candidate in used:
            count += 1
            candidate = f"{ex.id}#{count}"
        used.add(candidate)
        out.append(ex if count == 0 else Example(candidate, ex.prompt, ex.response, ex.system))
    return out


def load_examples_report(path: str | Path, *, skip_bad_rows: bool = False,
                         markup: tuple[str, ...] = ()) -> LoadReport:
    """Load prompt/response rows; a bad row raises ValueError naming file, line/item and field,
    unless ``skip_bad_rows``, which skips it and records the message in ``report.skipped``. A row
    whose text holds one of the strings ``markup`` (the tokenizer's special tokens: chat markup,
    see :func:`chat_markup`) is a bad row naming the token."""
    path = Path(path)
    skipped: list[str] = []
    examples, n_rows = [], 0
    for where, row in _read_rows(path):
        n_rows += 1
        try:
            system, prompt, response = _parse_example_row(row, where, markup)
        except _BadRow as err:
            if not skip_bad_rows:
                raise ValueError(str(err)) from None
            skipped.append(str(err))
            continue
        examples.append(Example(_content_id(path.stem, system, prompt, response), prompt, response, system))
    if not examples:
        raise ValueError(f"{path}: no valid rows ({n_rows} read, {len(skipped)} bad)")
    return LoadReport(_dedup_ids(examples), n_rows, skipped)


def load_examples(path: str | Path, *, skip_bad_rows: bool = False) -> list[Example]:
    """Load prompt/response rows (see the module docstring); skipped rows are logged as a warning.

    Use :func:`load_examples_report` to get the skipped rows as data.
    """
    report = load_examples_report(path, skip_bad_rows=skip_bad_rows)
    if report.skipped:
        logger.warning("%s: skipped %d of %d rows (first: %s)", path, len(report.skipped), report.n_rows,
                       report.skipped[0])
    return report.examples


def load_instructions(path: str | Path) -> list[str]:
    """Instruction-only lists: rows that are plain strings or ``{"instruction", "input"?}`` objects
    (other fields, e.g. ``category``, are ignored). Any bad row raises ValueError."""
    path = Path(path)
    instructions = []
    for where, row in _read_rows(path):
        if isinstance(row, _BadRow):
            raise ValueError(str(row))
        if isinstance(row, str):
            if not row.strip():
                raise ValueError(f"{where}: empty instruction")
            instructions.append(row)
            continue
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be a string or an object, got {type(row).__name__}")
        try:
            text = _text_field(row, "instruction", where)
            extra = _text_field(row, "input", where, required=False, allow_empty=True)
        except _BadRow as err:
            raise ValueError(str(err)) from None
        instructions.append(f"{text}\n\n{extra}" if extra.strip() else text)
    if not instructions:
        raise ValueError(f"{path}: no instructions")
    return instructions


def mix_examples(primary: list[Example], extra: list[Example], k: int, seed: int) -> list[Example]:
    """``primary`` plus ``k`` examples of ``extra`` sampled without replacement, shuffled; the same
    ``seed`` gives the same list. Ids repeated across the two get ``#n`` suffixes."""
    if not 0 <= k <= len(extra):
        raise ValueError(f"cannot mix in k={k} examples from a set of {len(extra)}: need 0 <= k <= {len(extra)}")
    rng = random.Random(seed)
    mixed = _dedup_ids(list(primary) + rng.sample(list(extra), k))
    rng.shuffle(mixed)
    return mixed


def mix_order(n_primary: int, primary_has_id, extra: list[Example], k: int,
              seed: int) -> tuple[np.ndarray, list[Example]]:
    """:func:`mix_examples` without the primary list: -> (order, picked) with
    ``mix_examples(primary, extra, k, seed)[i]`` equal to ``primary[order[i]]`` where
    ``order[i] < n_primary``, else ``picked[order[i] - n_primary]``. ``primary_has_id(s)`` tells
    whether a primary id equals ``s`` (the primary ids must be unique, as the loaders make them).
    Keeps 8 bytes a sample: the same random draws on an index array."""
    if not 0 <= k <= len(extra):
        raise ValueError(f"cannot mix in k={k} examples from a set of {len(extra)}: need 0 <= k <= {len(extra)}")
    rng = random.Random(seed)
    picked, used = [], set()
    for ex in rng.sample(list(extra), k):          # _dedup_ids after the (already unique) primary ids
        candidate, count = ex.id, 0
        while candidate in used or primary_has_id(candidate):
            count += 1
            candidate = f"{ex.id}#{count}"
        used.add(candidate)
        picked.append(ex if count == 0 else Example(candidate, ex.prompt, ex.response, ex.system))
    order = array("q", range(n_primary + k))
    rng.shuffle(order)                             # the same swaps as on the list of examples
    return np.frombuffer(order, np.int64), picked


def chat_markup(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special-token strings (bos, eos, pad, turn markers such as ``<|im_start|>``),
    longest first: inside data text the tokenizer would read them as markup, not as text."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


def markup_in(text: str | None, markup: tuple[str, ...]) -> str | None:
    """The string of ``markup`` that comes first in ``text`` (the longest of those starting there), or None."""
    found = [(text.find(token), -len(token), token) for token in markup if text and token in text]
    return min(found)[2] if found else None
