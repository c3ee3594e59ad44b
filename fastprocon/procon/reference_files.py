"""The z0 cache on disk: token-major shards, one per process of the build, plus an index.

A cache at ``path`` is the index file ``path`` and the shard files ``<stem>.shard<r>-of-<w><suffix>``
beside it (one shard for a single-process build); every process of a torchrun build writes its
own shard, and rank 0 writes the index from the shards' ids only, never holding z0 values.

Shard (safetensors, format ``fastprocon.procon.reference-shard``, written chunk by chunk):
``z0`` [n_tokens, n_layers] fp32 or bf16, token-major: sample i's response tokens are the rows
``offsets[i]:offsets[i+1]``, one contiguous range; ``offsets`` [n + 1] int64; ``id_bytes`` /
``id_offsets`` (UTF-8 ids); header: the identity fields, storage dtype, build id, rank and world.

Index (format ``fastprocon.procon.reference-index``): ``ids`` [n, W] uint8 (every sample id, NUL-padded
to the longest, sorted bytewise), ``shard`` [n] int32 and ``row`` [n] int64 (where each sample
is); header: the identity fields, storage dtype, build id, the shard file names and counts.
Readers (:class:`Z0Files`) memory-map all of it and copy only the rows they gather.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from fastprocon.utils.mapped import ChunkWriter, MappedFile, read_rows

INDEX_FORMAT = "fastprocon.reference-index"
SHARD_FORMAT = "fastprocon.reference-shard"
OLD_FORMAT = "fastprocon.reference"          # one merged file [n_layers, n_tokens] (before token-major shards)
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What a cache is valid for: ReferenceCache.load compares each with what the caller expects.
IDENTITY_FIELDS = ("model_fingerprint", "directions_hash", "dataset_hash", "max_length", "layers")
_SHARED = (*IDENTITY_FIELDS, "storage_dtype", "build_id")   # equal in the index and every shard
REBUILD = "rebuild it with `fastprocon reference` (or delete it: the trainer then makes it again)"


def shard_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.shard{rank}-of-{world}{path.suffix}")


def write_shard(path: str | os.PathLike, batches: Iterable[tuple[list[str], list[torch.Tensor]]], header: dict,
                rank: int, world: int) -> int:
    """Write the shard of ``rank`` from (ids, z0 pieces [n_layers, n_i] each) batches; header
    holds the identity fields, ``storage_dtype`` and ``build_id``. Returns the bytes written."""
    dtype = STORAGE_DTYPES[header["storage_dtype"]]
    n_layers, n_samples, n_tokens, n_id_bytes = len(header["layers"]), 0, 0, 0
    target = shard_path(path, rank, world)
    with ChunkWriter(target) as out:
        out.append("offsets", np.zeros(1, np.int64))
        out.append("id_offsets", np.zeros(1, np.int64))
        out.append("z0", torch.zeros(0, n_layers, dtype=dtype))
        out.append("id_bytes", np.zeros(0, np.uint8))
        for ids, pieces in batches:
            if len(ids) != len(pieces):
                raise ValueError(f"{len(ids)} ids but {len(pieces)} z0 pieces")
            if not ids:
                continue
            counts = np.array([p.shape[1] for p in pieces], dtype=np.int64)
            out.append("z0", torch.cat(pieces, dim=1).T.to(dtype))             # token-major rows
            out.append("offsets", n_tokens + np.cumsum(counts))
            encoded = [sample_id.encode() for sample_id in ids]
            out.append("id_bytes", np.frombuffer(b"".join(encoded), np.uint8))
            out.append("id_offsets", n_id_bytes + np.cumsum([len(b) for b in encoded], dtype=np.int64))
            n_samples, n_tokens, n_id_bytes = n_samples + len(ids), n_tokens + int(counts.sum()), \
                n_id_bytes + sum(map(len, encoded))
        return out.finish(SHARD_FORMAT, {**header, "rank": rank, "world": world, "n_samples": n_samples,
                                         "n_tokens": n_tokens})


def _shard_ids(shard: MappedFile) -> list[bytes]:
    data, offsets = np.asarray(shard.array("id_bytes")), np.asarray(shard.array("id_offsets"))
    raw = data.tobytes()
    return [raw[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def write_index(path: str | os.PathLike, world: int) -> int:
    """Write the index of the ``world`` shards beside ``path`` (reading only their ids); they must
    agree on every identity field and the build id, and no id may repeat. Returns the bytes of
    the index plus the shards."""
    path = Path(path)
    shards = [open_shard(path, r, world, None) for r in range(world)]
    first = shards[0].header
    for r, shard in enumerate(shards):
        for name in _SHARED:
            if shard.header.get(name) != first.get(name):
                raise ValueError(f"cannot index {shard.path}: {name} is {shard.header.get(name)!r}, shard 0 has "
                                 f"{first.get(name)!r}")
    ids = [_shard_ids(s) for s in shards]
    flat = [i for part in ids for i in part]
    width = max([len(i) for i in flat] + [1])
    table = np.array(flat, dtype=f"S{width}")
    order = np.argsort(table, kind="stable")
    table = table[order]
    if len(table) > 1 and np.any(table[1:] == table[:-1]):
        dup = table[1:][table[1:] == table[:-1]][0].decode()
        raise ValueError(f"duplicate sample id {dup!r} in the shards of {path}")
    shard_of = np.concatenate([np.full(len(part), r, np.int32) for r, part in enumerate(ids)])[order]
    row_of = np.concatenate([np.arange(len(part), dtype=np.int64) for part in ids])[order]
    header = {k: v for k, v in first.items() if k not in ("rank", "world", "n_samples", "n_tokens")}
    header.update(shards=[shard_path(path, r, world).name for r in range(world)],
                  shard_samples=[s.header["n_samples"] for s in shards], n_samples=len(flat),
                  n_tokens=sum(s.header["n_tokens"] for s in shards))
    with ChunkWriter(path) as out:
        out.append("ids", table.view(np.uint8).reshape(len(table), width))
        out.append("shard", shard_of)
        out.append("row", row_of)
        size = out.finish(INDEX_FORMAT, header)
    return size + sum(s.path.stat().st_size for s in shards)


def open_shard(path: Path, rank: int, world: int, index: dict | None) -> MappedFile:
    """Map shard ``rank`` of ``world`` of the cache at ``path``; with ``index`` (the index header)
    check it belongs to that build. Errors name the shard file."""
    target = shard_path(path, rank, world)
    if not target.is_file():
        raise FileNotFoundError(f"reference cache {path}: shard {target} is missing ({world} shard(s) expected); "
                                f"{REBUILD}")
    shard = MappedFile(target, SHARD_FORMAT)
    h = shard.header
    z0, offsets = shard.array("z0"), shard.array("offsets")
    n = h.get("n_samples") if index is None else index["shard_samples"][rank]
    if index is not None:
        for name in _SHARED:
            if h.get(name) != index.get(name):
                raise ValueError(f"{target}: belongs to another build of {path} ({name} {h.get(name)!r}, the index "
                                 f"has {index.get(name)!r}); {REBUILD}")
    if (z0.ndim != 2 or z0.shape[1] != len(h.get("layers", [])) or offsets.shape != (n + 1,)
            or offsets[0] != 0 or offsets[-1] != z0.shape[0] or np.any(np.diff(offsets) < 0)
            or shard.array("id_offsets").shape != (n + 1,)):
        raise ValueError(f"{target}: corrupt reference cache shard: z0 {tuple(z0.shape)}, offsets "
                         f"{tuple(offsets.shape)}, {n} samples, {len(h.get('layers', []))} layers do not fit together; "
                         f"{REBUILD}")
    return shard


class Z0Files:
    """An opened z0 cache: ``header`` (the index's), ``locate(ids)`` and ``rows(shard, row)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = Path(path)
        try:
            index = MappedFile(path, INDEX_FORMAT)
        except ValueError as err:
            if f"found format {OLD_FORMAT!r}" in str(err):
                raise ValueError(f"{path}: a reference cache in the old single-file layout; {REBUILD}") from None
            raise
        h = self.header = index.header
        missing = [name for name in (*_SHARED, "shards", "shard_samples", "n_samples") if name not in h]
        if missing:
            raise ValueError(f"{path}: corrupt reference cache index (header lacks {', '.join(missing)}); {REBUILD}")
        ids, self._shard_of, self._row_of = index.array("ids"), index.array("shard"), index.array("row")
        n, world = h["n_samples"], len(h["shards"])
        if ids.ndim != 2 or ids.shape[0] != n or self._shard_of.shape != (n,) or self._row_of.shape != (n,):
            raise ValueError(f"{path}: corrupt reference cache index: ids {tuple(ids.shape)}, {n} samples; {REBUILD}")
        self._width = ids.shape[1]
        self._ids = ids.view(f"S{self._width}").reshape(n)    # sorted, for binary search
        self.shards = [open_shard(path, r, world, h) for r in range(world)]
        self._z0 = [s.array("z0") for s in self.shards]
        self._offsets = [s.array("offsets") for s in self.shards]
        self._tag = self.shards[0].tag("z0") if self.shards else "F32"

    def __len__(self) -> int:
        return int(self.header["n_samples"])

    def file_paths(self) -> list[Path]:
        """Every file the cache consists of: the index, then its shards."""
        return [self.path, *(s.path for s in self.shards)]

    def locate(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(shard [B], row [B], positions in ``ids`` of the ids not in the cache)."""
        encoded = [sample_id.encode() for sample_id in ids]
        keys = np.array([b if len(b) <= self._width else b"" for b in encoded], dtype=f"S{self._width}")
        pos = np.minimum(np.searchsorted(self._ids, keys), max(len(self) - 1, 0))
        found = (self._ids[pos] == keys) & np.array([0 < len(b) <= self._width for b in encoded], dtype=bool) \
            if len(self) else np.zeros(len(ids), bool)
        return self._shard_of[pos], self._row_of[pos], [i for i in range(len(ids)) if not found[i]]

    def count(self, shard: int, row: int) -> int:
        return int(self._offsets[shard][row + 1] - self._offsets[shard][row])

    def chunks(self, samples_per_chunk: int = 4096):
        """Yield every sample's z0 rows, ``samples_per_chunk`` samples at a time (fp32 [n, n_layers]
        each), in the index's order (sorted ids): the same sequence of values whatever the number
        of shards the cache was built with."""
        for start in range(0, len(self), samples_per_chunk):
            stop = min(start + samples_per_chunk, len(self))
            yield self.rows(list(zip(self._shard_of[start:stop].tolist(), self._row_of[start:stop].tolist())))

    def rows(self, pieces: list[tuple[int, int]]) -> torch.Tensor:
        """z0 rows of the samples (shard, row), concatenated: [sum n_i, n_layers] fp32 (only
        these rows are read and upcast; read from the files, not through the maps, so the
        process keeps none of the pages: see :func:`fastprocon.utils.mapped.read_rows`)."""
        if not pieces:
            return torch.zeros(0, len(self.header["layers"]))
        ranges = [(s, int(self._offsets[s][r]), int(self._offsets[s][r + 1])) for s, r in pieces]
        z0 = self._z0[pieces[0][0]]
        out = np.empty((sum(stop - start for _, start, stop in ranges), *z0.shape[1:]), z0.dtype)
        at = 0
        for s, start, stop in ranges:
            read_rows(self._z0[s], start, stop, out[at:at + stop - start])
            at += stop - start
        t = torch.from_numpy(out)
        return (t.view(torch.bfloat16) if self._tag == "BF16" else t).float()
