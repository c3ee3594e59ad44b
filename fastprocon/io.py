"""Files written atomically: JSON, and safetensors with a typed JSON header.

Every writer goes through :func:`atomic_path`: the data lands in a temp file in the target's
directory, which is renamed onto the target only when complete, so a reader (or a crash) sees
the old file or the whole new one, never a partial write.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

FORMAT_VERSION = "1"
# The process umask (os.umask can only be read by setting it): atomically written files get the
# mode a plain open() would give them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp file path next to ``path``; it is renamed onto ``path`` on success, removed on error.

    Readers of ``path`` see the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file in the same dir, then rename)."""
    path = Path(path)
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return path


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str, header: dict) -> int:
    """Write ``tensors`` with ``header`` (JSON) atomically; returns the bytes written.

    ``kind`` names the file format (e.g. "fastprocon.directions"); :func:`read_safetensors`
    refuses a file of another kind.
    """
    from safetensors.torch import save_file

    metadata = {"format": kind, "version": FORMAT_VERSION, "metadata": json.dumps(header, allow_nan=False)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        return os.path.getsize(tmp)


def read_safetensors(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors on CPU, header dict) of a file written by :func:`save_safetensors` as ``kind``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:   # safetensors raises its own error type for a truncated/garbled file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != kind:
        raise ValueError(f"{path}: expected a {kind} file, found format {metadata.get('format')!r}")
    try:
        header = json.loads(metadata["metadata"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: missing or corrupt metadata in the file header ({err})") from err
    return tensors, header
