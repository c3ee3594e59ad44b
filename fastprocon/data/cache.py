"""Tokenized data, cached on disk and memory-mapped: tokenize once, every start and process reuses it.

:func:`load_tokenized` looks for a cache file keyed by everything the tokens depend on: each
data file's content (sha256) and stem (sample ids carry it), the tokenizer (its serialised
vocabulary/merges, class, special tokens), the chat template, ``max_length``,
``drop_overlong_prompts``, the layout version and the caller's settings (bad-row skipping, the
safety mix and its seed). On a miss the set is tokenized by :func:`fastprocon.data.examples.tokenize_chunk`
in chunks and written atomically (a .jsonl file is streamed: one pass validates it and keeps 32
bytes a row, line offset, id digest and what the id suffixes need, then each chunk's rows are read again, so the build
holds one chunk of rows, not the data set; the file it writes is the one the whole-list build
wrote, byte for byte); under torch.distributed rank 0 builds while the others wait
on the process group's store (:func:`fastprocon.distributed.collectives.on_main` with a ``wait``:
no collective, so no collective timeout however long it takes; an error reaches every rank), and
a rank that still does not see the file (a cache directory local to each node) builds its own copy.
A hit costs a hash of the data files and a few maps.

File (safetensors, format ``fastprocon.tokens``, written by :class:`fastprocon.utils.mapped.ChunkWriter`):
``tokens`` [n_tokens] int32 (every sample's input ids back to back), ``offsets`` [n + 1] int64,
``prompt_lengths`` [n] int32 (labels are -100 on the first prompt_lengths[i] tokens and equal to
the input ids after), ``id_bytes`` [..] uint8 + ``id_offsets`` [n + 1] int64 (UTF-8 sample
ids); header: the key and its parts, the dataset hash, counts. A :class:`TokenizedDataset` over
it keeps only per-sample counts in memory (40 bytes a sample) and materialises a
:class:`~fastprocon.data.examples.TokenizedExample` when indexed, so each process reads only the
samples of its own micro-batches, with :func:`fastprocon.utils.mapped.read_rows` (from the file, not
through the map: the pages a map touches would stay in the process's resident set).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from fastprocon.data.examples import IGNORE_INDEX, Example, chat_markup, load_examples_report, mix_order, scan_jsonl
from fastprocon.data.tokenize import TokenizedExample, check_overlong, hash_sorted_examples, tokenize_chunk
from fastprocon.distributed.collectives import on_main
from fastprocon.utils.checksums import file_sha256
from fastprocon.utils.mapped import ChunkWriter, MappedFile, read_rows

logger = logging.getLogger(__name__)

CACHE_FORMAT = "fastprocon.tokens"
LAYOUT_VERSION = 3          # bump when tokenization or the layout changes: old files are then never found
CHUNK = 4096                # examples tokenized per call
_ARRAYS = ("tokens", "offsets", "prompt_lengths", "id_bytes", "id_offsets")
_CHECK_BLOCK = 1 << 22      # bytes per read when an array is hashed (open_cache's check)
_HASH_BLOCK = 1 << 20       # data files are hashed 1 MiB at a time: a 16 MiB block was most of a streamed build's peak


class TokenizedDataset(Sequence):
    """Tokenized samples as flat arrays (in memory, or memory-mapped from a cache file).

    ``ds[i]`` -> TokenizedExample (a copy of sample i); ``ds.id(i)`` its id. Per-sample counts,
    int64 [n] numpy arrays in memory: ``lengths`` (tokens), ``n_response`` (labels != -100),
    ``n_predicted`` (response tokens after position 0: the CE terms). ``hash`` equals
    :func:`fastprocon.data.examples.dataset_hash` of the same examples; ``info`` holds what the build
    recorded (n_truncated, n_primary, bad rows...).
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, prompt_lengths: np.ndarray, id_bytes: np.ndarray,
                 id_offsets: np.ndarray, *, info: dict | None = None, content_hash: str | None = None,
                 path: Path | None = None):
        self.tokens, self.id_bytes, self.id_offsets = tokens, id_bytes, id_offsets
        self.offsets = _in_memory(offsets)
        self.prompt_lengths = _in_memory(prompt_lengths)
        self.lengths = np.diff(self.offsets)
        self.n_response = self.lengths - self.prompt_lengths
        self.n_predicted = self.n_response - (self.prompt_lengths == 0)
        self.info, self.path, self._hash = dict(info or {}), path, content_hash

    @classmethod
    def from_examples(cls, examples: list[TokenizedExample]) -> "TokenizedDataset":
        """In-memory arrays of ``examples``, whose labels must be -100 on a prefix and equal to
        the input ids after it (as :func:`fastprocon.data.examples.tokenize_examples` makes them)."""
        prompt_lengths = []
        for ex in examples:
            p = len(ex.labels) - sum(label != IGNORE_INDEX for label in ex.labels)
            if len(ex.labels) != len(ex.input_ids) or ex.labels[p:] != ex.input_ids[p:] or any(
                    label != IGNORE_INDEX for label in ex.labels[:p]):
                raise ValueError(f"sample {ex.id!r}: labels must be -100 on the prompt and equal to input_ids after it")
            prompt_lengths.append(p)
        ids = [ex.id.encode() for ex in examples]
        return cls(np.fromiter(itertools.chain.from_iterable(ex.input_ids for ex in examples), np.int64),
                   _offsets([len(ex.input_ids) for ex in examples]), np.asarray(prompt_lengths, np.int64),
                   np.frombuffer(b"".join(ids), np.uint8), _offsets([len(b) for b in ids]))

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def id(self, i: int) -> str:
        start, stop = read_rows(self.id_offsets, i, i + 2)
        return read_rows(self.id_bytes, start, stop).tobytes().decode()

    def __getitem__(self, i: int | slice) -> TokenizedExample | list[TokenizedExample]:
        if isinstance(i, slice):   # a list of the samples (each materialised, as one index would)
            return [self[j] for j in range(*i.indices(len(self)))]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"a TokenizedDataset is indexed by an int or a slice, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i = int(i) % len(self)
        input_ids = read_rows(self.tokens, self.offsets[i], self.offsets[i + 1]).tolist()
        p = int(self.prompt_lengths[i])
        return TokenizedExample(self.id(i), input_ids, [IGNORE_INDEX] * p + input_ids[p:])

    @property
    def hash(self) -> str:
        """sha256 over (id, input_ids, labels) of every sample in id order (see data.dataset_hash)."""
        if self._hash is None:
            self._hash = hash_sorted_examples(self[int(i)] for i in self._id_order())
        return self._hash

    def _id_order(self) -> np.ndarray:
        """``sorted(range(len(self)), key=self.id)`` as a numpy argsort of the UTF-8 ids (their byte
        order is the code-point order; ids hold no NUL): about (longest id) bytes a sample."""
        n, id_offsets = len(self), _in_memory(self.id_offsets)
        ids = np.zeros(n, f"S{max(int(np.diff(id_offsets).max(initial=1)), 1)}")
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            start = int(id_offsets[a])
            buf = read_rows(self.id_bytes, start, int(id_offsets[b])).tobytes()
            ids[a:b] = [buf[int(id_offsets[i]) - start:int(id_offsets[i + 1]) - start] for i in range(a, b)]
        return np.argsort(ids, kind="stable")


def _in_memory(array) -> np.ndarray:
    """An int64 in-memory copy of ``array`` (read from the file if it is a memory map)."""
    array = read_rows(array, 0, len(array)) if isinstance(array, np.ndarray) else np.asarray(array)
    return array.astype(np.int64, copy=False)


def _offsets(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)


def as_dataset(tokenized) -> TokenizedDataset:
    """``tokenized`` itself if a TokenizedDataset, else the in-memory form of a list of examples."""
    return tokenized if isinstance(tokenized, TokenizedDataset) else TokenizedDataset.from_examples(list(tokenized))


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

def data_cache_dir() -> Path:
    """``$FASTPROCON_DATA_CACHE``, else ``$FASTPROCON_CACHE/data``, else ``~/.cache/fastprocon/data``."""
    if os.environ.get("FASTPROCON_DATA_CACHE"):
        return Path(os.environ["FASTPROCON_DATA_CACHE"]).expanduser()
    base = os.environ.get("FASTPROCON_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "fastprocon") / "data"


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what tokenization and the chat template depend on: the tokenizer's class, its
    serialised model (vocabulary, merges, normaliser, added tokens; the vocabulary itself for a
    slow tokenizer), the chat template, the special tokens and the eos id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, model, json.dumps(tokenizer.chat_template, sort_keys=True),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str), str(tokenizer.eos_token_id)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(sources: list[Path], tokenizer, max_length: int, drop_overlong_prompts: bool,
              settings: dict) -> tuple[str, dict]:
    """(sha256 key, its parts) of the tokenized set made from ``sources`` with these settings."""
    files = [{"stem": p.stem, "sha256": file_sha256(p, _HASH_BLOCK)} for p in sources]
    parts = {"layout": LAYOUT_VERSION, "files": files,
             "tokenizer": tokenizer_hash(tokenizer), "max_length": int(max_length),
             "drop_overlong_prompts": bool(drop_overlong_prompts), "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def load_tokenized(sources: list[Path], make_examples: Callable[[], tuple[list[Example], dict]], tokenizer,
                   max_length: int, *, drop_overlong_prompts: bool = False, settings: dict | None = None,
                   cache_dir: Path | None = None) -> TokenizedDataset:
    """The tokenized form of ``make_examples()``'s examples, from the cache when it holds this key.

    ``sources``: every file the examples come from; ``settings``: JSON-able values besides the
    files, tokenizer and max_length that change the examples (they go into the key);
    ``make_examples`` -> (examples, info to keep in the file, e.g. {"n_primary": ...}), called
    only on a miss. Raises what tokenization raises (on every rank), or ValueError naming a
    corrupt or stale cache file.
    """
    key, parts = cache_key(sources, tokenizer, max_length, drop_overlong_prompts, settings or {})
    path = Path(cache_dir or data_cache_dir()) / f"{sources[0].stem}-{key[:24]}.tokens.safetensors"

    def build_if_missing() -> None:
        if not path.exists():
            build_cache(path, key, parts, make_examples, tokenizer, max_length, drop_overlong_prompts)

    # rank 0 builds while the others wait on the process group's store, not in a collective (a long
    # tokenization must not run into the collective timeout, 10-30 minutes); its error is raised on every rank
    on_main(build_if_missing, wait=WAIT, tag=f"fastprocon.data.cache/{key}")
    build_if_missing()      # a no-op unless this process cannot see rank 0's directory
    return open_cache(path, key)


WAIT = timedelta(hours=24)     # how long the other ranks wait for rank 0's tokenization


def load_training_set(path: Path, tokenizer, max_length: int, *, skip_bad_rows: bool = False,
                      drop_overlong_prompts: bool = False, safety: Path | None = None, safety_samples: int = 0,
                      seed: int = 0, cache_dir: Path | None = None) -> TokenizedDataset:
    """The rows of ``path`` (plus ``safety_samples`` rows of ``safety`` mixed in by ``seed``, as
    :func:`fastprocon.data.examples.mix_examples`), tokenized, through the cache. ``info`` holds n_rows,
    n_primary, n_examples (before over-long prompts are dropped), n_skipped, first_skipped,
    n_truncated."""
    sources, settings = [Path(path)], {"skip_bad_rows": bool(skip_bad_rows)}
    if safety_samples > 0:
        sources.append(Path(safety))
        settings.update(safety_samples=int(safety_samples), seed=int(seed))

    def make_examples() -> tuple[Sequence[Example], dict]:
        # a .jsonl file is streamed (a RowScan keeps 32 bytes a row, the mix order 8 more; build_cache reads CHUNK
        # rows at a time); a .json list is parsed whole, as before. The small safety set is held in memory.
        markup = chat_markup(tokenizer)     # rows holding special tokens are bad rows (named by file and line)
        if sources[0].suffix == ".jsonl":
            primary = scan_jsonl(sources[0], skip_bad_rows=skip_bad_rows, markup=markup)
        else:
            primary = _InMemory(load_examples_report(sources[0], skip_bad_rows=skip_bad_rows, markup=markup))
        n_rows, n_skipped, first_skipped = primary.n_rows, primary.n_skipped, primary.first_skipped
        examples = _Streamed(primary)
        if safety_samples > 0:
            extra = load_examples_report(sources[1], skip_bad_rows=skip_bad_rows, markup=markup)
            if safety_samples > len(extra.examples):
                raise ValueError(f"safety_samples = {safety_samples} but {sources[1].stem} has only "
                                 f"{len(extra.examples)} examples ({sources[1]})")
            examples = _Streamed(primary, *mix_order(len(primary), primary.has_id, extra.examples, safety_samples,
                                                     seed))
            n_rows += extra.n_rows
            n_skipped += len(extra.skipped)
            first_skipped = first_skipped or (extra.skipped[0] if extra.skipped else None)
        return examples, {"n_rows": n_rows, "n_primary": len(primary), "n_examples": len(examples),
                          "n_skipped": n_skipped, "first_skipped": first_skipped}

    data = load_tokenized(sources, make_examples, tokenizer, max_length, drop_overlong_prompts=drop_overlong_prompts,
                          settings=settings, cache_dir=cache_dir)
    if data.info.get("n_skipped"):
        logger.warning("%s: skipped %d of %d rows (first: %s)", path, data.info["n_skipped"], data.info["n_rows"],
                       data.info["first_skipped"])
    return data


class _InMemory:
    """A :class:`fastprocon.data.examples.LoadReport` (a .json list, parsed whole) as a RowScan."""

    def __init__(self, report):
        self._examples, self.n_rows, self.n_skipped = report.examples, report.n_rows, len(report.skipped)
        self.first_skipped = report.skipped[0] if report.skipped else None
        self._ids = None

    def __len__(self) -> int:
        return len(self._examples)

    def has_id(self, candidate: str) -> bool:
        if self._ids is None:
            self._ids = {ex.id for ex in self._examples}
        return candidate in self._ids

    def examples(self, rows) -> list[Example]:
        return [self._examples[int(i)] for i in rows]


class _Streamed:
    """The examples list that make_examples used to return, read ``CHUNK`` at a time: sample i is
    primary row ``order[i]`` (or ``picked[order[i] - len(primary)]``), row i when no order."""

    def __init__(self, primary, order: np.ndarray | None = None, picked: list[Example] = ()):
        self.primary, self.order, self.picked = primary, order, list(picked)

    def __len__(self) -> int:
        return len(self.primary) if self.order is None else len(self.order)

    def __getitem__(self, part: slice) -> list[Example]:
        if not isinstance(part, slice):
            raise TypeError("read the examples by slices")
        rows = np.arange(*part.indices(len(self))) if self.order is None else self.order[part]
        n = len(self.primary)
        mine = rows < n
        read = iter(self.primary.examples(rows[mine]))
        return [next(read) if own else self.picked[int(r) - n] for r, own in zip(rows, mine)]


def build_cache(path: Path, key: str, parts: dict, make_examples: Callable[[], tuple[Sequence[Example], dict]],
                tokenizer, max_length: int, drop_overlong_prompts: bool) -> int:
    """Tokenize ``make_examples()`` chunk by chunk into the cache file ``path``; returns its bytes.
    The examples may be any sequence that gives ``len`` and lists for slices (a list, or
    load_training_set's file reader): only one chunk of them is held at a time."""
    examples, info = make_examples()
    n_truncated, overlong, n_tokens, n_id_bytes = 0, [], 0, 0
    logger.info("tokenizing %d examples into %s", len(examples), path)
    with ChunkWriter(path) as out:
        out.append("offsets", np.zeros(1, np.int64))
        out.append("id_offsets", np.zeros(1, np.int64))
        for start in range(0, len(examples), CHUNK):
            kept, truncated, long_prompts = tokenize_chunk(examples[start:start + CHUNK], tokenizer, max_length)
            n_truncated += truncated
            overlong += long_prompts
            lengths = np.fromiter((len(ex.input_ids) for ex in kept), np.int64, len(kept))
            out.append("tokens", np.fromiter(itertools.chain.from_iterable(ex.input_ids for ex in kept), np.int32,
                                             int(lengths.sum())))
            out.append("offsets", n_tokens + np.cumsum(lengths))
            n_tokens += int(lengths.sum())
            out.append("prompt_lengths", np.fromiter((ex.labels.count(IGNORE_INDEX) for ex in kept), np.int32,
                                                     len(kept)))
            ids = [ex.id.encode() for ex in kept]
            out.append("id_bytes", np.frombuffer(b"".join(ids), np.uint8) if ids else np.zeros(0, np.uint8))
            out.append("id_offsets", n_id_bytes + np.cumsum([len(b) for b in ids], dtype=np.int64))
            n_id_bytes += sum(map(len, ids))
        check_overlong(overlong, max_length, drop_overlong_prompts)
        for name in ("tokens", "prompt_lengths", "id_bytes"):
            out.append(name, np.zeros(0, {"id_bytes": np.uint8}.get(name, np.int32)))   # declared if never written
        data = TokenizedDataset(*(out.mapped(name) for name in _ARRAYS))
        header = {"key": key, "key_parts": parts, "n_samples": len(data), "n_tokens": n_tokens,
                  "dataset_hash": data.hash, "info": {**info, "n_truncated": n_truncated},
                  "array_sha256": {name: array_sha256(out.mapped(name)) for name in _ARRAYS},
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        del data
        return out.finish(CACHE_FORMAT, header)


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's bytes, read a block at a time from its file (see ``read_rows``)."""
    digest = hashlib.sha256()
    rows = max(1, _CHECK_BLOCK // max(array.itemsize, 1))
    for start in range(0, len(array), rows):
        digest.update(read_rows(array, start, min(start + rows, len(array))).data)
    return digest.hexdigest()


def open_cache(path: Path, key: str | None = None) -> TokenizedDataset:
    """Map a cache file; ValueError naming it if it is unreadable, inconsistent, changed since it
    was written (each array's sha256, from the header, is checked: one read of the file) or
    (``key`` given) made for another key."""
    hint = "delete it and it is rebuilt on the next start"
    try:
        f = MappedFile(path, CACHE_FORMAT)
        arrays = [f.array(name) for name in _ARRAYS]
    except ValueError as err:
        raise ValueError(f"{err}; {hint}" if str(path) in str(err) else f"{path}: {err}; {hint}") from None
    h = f.header
    if key is not None and h.get("key") != key:
        raise ValueError(f"{path}: stale data cache: made for key {str(h.get('key'))[:24]}, not {key[:24]} (another "
                         f"data file, tokenizer or setting); {hint}")
    tokens, offsets, prompt_lengths, id_bytes, id_offsets = arrays
    n = h.get("n_samples")
    offsets, prompt_lengths = _in_memory(offsets), _in_memory(prompt_lengths)   # kept by the dataset
    problems = [] if n == len(prompt_lengths) and offsets.shape == (n + 1,) and id_offsets.shape == (n + 1,) else [
        "sample counts differ"]
    if not problems:
        if offsets[0] != 0 or offsets[-1] != len(tokens) or id_offsets[0] != 0 or id_offsets[-1] != len(id_bytes):
            problems.append("offsets do not span the tokens / ids")
        elif np.any(np.diff(offsets) <= prompt_lengths) or np.any(np.diff(_in_memory(id_offsets)) <= 0):
            problems.append("a sample with no response token or no id")
        elif not isinstance(h.get("dataset_hash"), str) or not isinstance(h.get("info"), dict) \
                or not isinstance(h.get("array_sha256"), dict):
            problems.append("header without dataset_hash / info / array_sha256")
        else:   # values changed in place (the structure intact) are found only by their checksums
            changed = [name for name, array in zip(_ARRAYS, arrays)
                       if array_sha256(array) != h["array_sha256"].get(name)]
            if changed:
                problems.append(f"{changed[0]} fails its sha256 checksum")
    if problems:
        raise ValueError(f"{path}: corrupt data cache ({problems[0]}); {hint}")
    return TokenizedDataset(tokens, offsets, prompt_lengths, id_bytes, id_offsets, info=h["info"],
                            content_hash=h["dataset_hash"], path=path)
