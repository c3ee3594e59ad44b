"""Safetensors files larger than memory: written chunk by chunk, read through memory maps.

The tokenized-data cache and the z0 cache can outgrow a process's memory. :class:`ChunkWriter`
appends each tensor's rows to a raw file as they are made and assembles a standard safetensors
file at the end (header, then the raw files copied in; written atomically through
``io.atomic_path``). :class:`MappedFile` opens one as numpy memory maps: a reader touches only
the pages it slices (page cache, shared by the processes of a node) and nothing is copied or
upcast until it asks. Per-sample reads (a micro-batch's tokens, its z0 rows) go through
:func:`read_rows`, which reads the rows from the map's file with ``os.preadv`` instead of through
the map: pages touched through a map stay in the process's resident set (with the kernel's
fault-around, 64 KiB for every sample read), so random reads over a long run would grow every
process by up to the file's size. Files carry the typed header of ``io.save_safetensors`` (format, version,
metadata JSON), so ``io.read_safetensors`` and ``safetensors.safe_open`` read them too.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastprocon.utils.io import FORMAT_VERSION, atomic_path, naming

# safetensors dtype tag <-> numpy storage dtype (bf16 is stored and mapped as its uint16 bits)
_NUMPY = {"F64": np.float64, "I64": np.int64, "F32": np.float32, "I32": np.int32, "BF16": np.uint16,
          "F16": np.float16, "I16": np.int16, "U16": np.uint16, "U8": np.uint8}
_TAG = {np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.float32): "F32",
        np.dtype(np.int32): "I32", np.dtype(np.float16): "F16", np.dtype(np.int16): "I16",
        np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8"}


def _as_numpy(array) -> tuple[str, np.ndarray]:
    """(dtype tag, C-contiguous numpy array) of a numpy array or CPU tensor (bf16 as uint16 bits)."""
    if isinstance(array, torch.Tensor):
        if array.dtype == torch.bfloat16:
            return "BF16", np.ascontiguousarray(array.detach().cpu().view(torch.int16).numpy().view(np.uint16))
        array = array.detach().cpu().numpy()
    array = np.ascontiguousarray(array)
    if array.dtype not in _TAG:
        raise TypeError(f"unsupported dtype {array.dtype} for a mapped safetensors file")
    return _TAG[array.dtype], array


def to_torch(array: np.ndarray, tag: str) -> torch.Tensor:
    """A torch copy of (a slice of) a mapped array; ``tag`` "BF16" reinterprets uint16 bits."""
    t = torch.from_numpy(np.array(array))         # a copy: a mapped array is read-only
    return t.view(torch.bfloat16) if tag == "BF16" else t


class ChunkWriter:
    """Build a safetensors file at ``path`` from row chunks: ``append(name, rows)`` any number of
    times per tensor (rows stack along dim 0; the other dims must agree), then ``finish(kind,
    header)``. Use as a context manager: an error removes the partial files, and ``path`` is
    only replaced by a complete file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".parts", dir=self.path.parent))
        self._parts: dict[str, list] = {}     # name -> [tag, row shape, rows, open file]

    def append(self, name: str, rows) -> None:
        tag, array = _as_numpy(rows)
        if array.ndim == 0:
            raise ValueError(f"{name}: append rows (an array of at least one dimension), got a scalar")
        part = self._parts.get(name)
        if part is None:
            part = self._parts[name] = [tag, array.shape[1:], 0, open(self._dir / name, "wb")]
        elif (part[0], part[1]) != (tag, array.shape[1:]):
            raise ValueError(f"{name}: rows {tag} {array.shape[1:]} do not match the earlier {part[0]} {part[1]}")
        with naming(self.path):     # a full disk names the file being made (tofile's error has no errno)
            part[3].write(array.data)
        part[2] += array.shape[0]

    def mapped(self, name: str) -> np.ndarray:
        """A read-only memory map of the rows of ``name`` appended so far (before ``finish``)."""
        tag, row_shape, rows, f = self._parts[name]
        f.flush()
        return _memmap(self._dir / name, _NUMPY[tag], 0, (rows, *row_shape))

    def finish(self, kind: str, header: dict) -> int:
        """Write the file (tensors with wider elements first, so every tensor is aligned);
        returns its size in bytes."""
        names = sorted(self._parts, key=lambda n: -np.dtype(_NUMPY[self._parts[n][0]]).itemsize)
        entries, offset = {}, 0
        for name in names:
            tag, row_shape, rows, f = self._parts[name]
            f.close()
            size = os.path.getsize(self._dir / name)
            entries[name] = {"dtype": tag, "shape": [rows, *row_shape], "data_offsets": [offset, offset + size]}
            offset += size
        entries["__metadata__"] = {"format": kind, "version": FORMAT_VERSION,
                                   "metadata": json.dumps(header, allow_nan=False)}
        blob = json.dumps(entries, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)                        # data starts 8-byte aligned
        try:
            with naming(self.path), atomic_path(self.path) as tmp:
                with open(tmp, "wb") as out:
                    out.write(struct.pack("<Q", len(blob)) + blob)
                    for name in names:
                        with open(self._dir / name, "rb") as src:
                            shutil.copyfileobj(src, out, 16 << 20)
                size = os.path.getsize(tmp)
        finally:
            self.close()
        return size

    def close(self) -> None:
        """Drop the partial files (called by ``finish`` and on errors)."""
        for part in self._parts.values():
            part[3].close()
        self._parts = {}
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _memmap(path: Path, dtype, offset: int, shape: tuple) -> np.ndarray:
    if int(np.prod(shape)) == 0:          # mmap cannot map zero bytes
        return np.empty(shape, dtype=dtype)
    array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    array._source = _Source(path, offset)   # only this object has it: a slice of it is not row 0 at `offset`
    return array


class _Source:
    """The file and byte offset behind a memory map made by :func:`_memmap`; the file is opened
    on the first read (a forked process shares the descriptor: ``preadv`` has no file position)."""

    def __init__(self, path: Path, offset: int):
        self.path, self.offset, self._file = Path(path), int(offset), None

    def read_into(self, start_byte: int, out: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        view = memoryview(out).cast("B")
        done = os.preadv(self._file.fileno(), [view], self.offset + start_byte)
        while done < len(view):             # a short read: only at the end of a file cut short since it was mapped
            n = os.preadv(self._file.fileno(), [view[done:]], self.offset + start_byte + done)
            if n <= 0:
                raise ValueError(f"{self.path}: file ends before byte {self.offset + start_byte + done} (truncated?)")
            done += n


def read_rows(array: np.ndarray, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """A copy of ``array[start:stop]`` (rows along dim 0), written into ``out`` if given (C-
    contiguous, that shape and dtype). For a memory map of this module's (``MappedFile.array``,
    ``ChunkWriter.mapped``) the bytes are read from its file, not through the map, so no page of
    the file stays in this process's resident set; any other array is sliced and copied."""
    start, stop, n = int(start), int(stop), len(array)
    if not 0 <= start <= stop <= n:
        raise IndexError(f"rows {start}:{stop} out of range for {n} rows")
    shape = (stop - start, *array.shape[1:])
    if out is None:
        out = np.empty(shape, array.dtype)
    elif out.shape != shape or out.dtype != array.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {array.dtype} {shape}, got {out.dtype} {out.shape}")
    source = array.__dict__.get("_source") if type(array) is np.memmap else None
    if source is None or stop == start:
        out[...] = array[start:stop]
    else:
        source.read_into(start * (array.nbytes // n), out)
    return out


def read_safetensors_header(path: str | os.PathLike) -> tuple[int, dict]:
    """(n, header) of a safetensors file: its JSON header as stored ({tensor name: {"dtype",
    "shape", "data_offsets"}}, and "__metadata__" when the file has one) and the header's length
    n in bytes (the tensor data start at byte 8 + n). ValueError naming the file when the length
    field is missing, zero or past the end of the file, or the header is not a JSON object."""
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path}: not a readable safetensors file (header length {n}, file {size} bytes: "
                             "truncated?)")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise ValueError(f"{path}: not a readable safetensors file (corrupt header: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a readable safetensors file (corrupt header: not a JSON object)")
    return n, header


class MappedFile:
    """A safetensors file of format ``kind`` opened for lazy reads.

    ``header`` is the JSON metadata; ``array(name)`` a read-only numpy memory map of a tensor
    (bf16 as uint16 bits; ``tag(name)`` says which). Raises FileNotFoundError for a missing
    file and ValueError (naming the file) for a truncated or garbled one or another format.
    """

    def __init__(self, path: str | os.PathLike, kind: str):
        self.path = path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a directory; expected a {kind} file")
        if not path.is_file():
            raise FileNotFoundError(f"{kind} file not found: {path}")
        size = path.stat().st_size
        n, entries = read_safetensors_header(path)
        try:
            meta = entries.pop("__metadata__", None) or {}
            end = 0
            for name, e in entries.items():
                begin, stop = e["data_offsets"]
                want = int(np.prod(e["shape"])) * np.dtype(_NUMPY[e["dtype"]]).itemsize
                if stop - begin != want:
                    raise ValueError(f"tensor {name}: {stop - begin} bytes for shape {e['shape']}")
                end = max(end, stop)
            if 8 + n + end != size:
                raise ValueError(f"the file has {size} bytes, its header describes {8 + n + end} (truncated?)")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
        if meta.get("format") != kind:
            raise ValueError(f"{path}: expected a {kind} file, found format {meta.get('format')!r}")
        try:
            self.header = json.loads(meta["metadata"])
        except (KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: missing or corrupt metadata in the file header ({err})") from None
        self._entries, self._data_start = entries, 8 + n

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def tag(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def array(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise ValueError(f"{self.path}: corrupt file: no tensor {name!r} (has {sorted(self._entries)})")
        e = self._entries[name]
        return _memmap(self.path, _NUMPY[e["dtype"]], self._data_start + e["data_offsets"][0], tuple(e["shape"]))
