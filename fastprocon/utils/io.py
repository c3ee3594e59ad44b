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
from typing import Iterable, Iterator, Mapping

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


# a directory holding one of these is a training run's directory (see fastprocon.train)
RUN_DIR_MARKERS = ("config.toml", "metrics.jsonl", "checkpoints")


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError that names no file (a failed write: disk full, file too large) as one
    that names ``path``, so the error says where."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
        raise


def owning_run(file: str | os.PathLike) -> Path | None:
    """The training run directory ``file`` sits in (one of :data:`RUN_DIR_MARKERS` beside it), or None."""
    parent = Path(file).parent
    return parent if any((parent / marker).exists() for marker in RUN_DIR_MARKERS) else None


def check_output(path: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None] | None = None, *,
                 arg: str = "--out", files: Iterable[str] | None = None, force: bool | None = None) -> Path:
    """Check before any work that a command's output ``path`` (the value of ``arg``) can be written.

    ``files`` None: ``path`` is an output file; else it is an output directory that gets these
    file names. Each file written must not be an existing directory nor the same file as one of
    ``inputs`` (argument name -> path; missing or None entries are skipped), and no existing
    parent may be a regular file. With ``force`` False, an existing file in a training run's
    directory (:func:`owning_run`) is refused too: replacing a run's directions or reference cache
    would change what it resumes with. Raises ValueError naming ``arg``; returns ``path`` as a Path.
    """
    path = Path(path)
    if files is None:
        targets = [path]
        if path.is_dir():
            raise ValueError(f"{arg} {path} is a directory; give a file path")
    else:
        targets = [path / name for name in files]
        if path.exists() and not path.is_dir():
            raise ValueError(f"{arg} {path} exists and is not a directory; give a directory path")
    # the nearest existing directory decides whether the missing ones (and the files) can be created
    full = Path(os.path.abspath(path))
    for parent in ([full] if files is not None else []) + list(full.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{arg} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{arg} {path}: directory {parent} is not writable")
            break
    for target in targets:
        run = owning_run(target) if force is False and target.is_file() else None
        if run is not None:
            raise ValueError(f"{arg} {path}: {target} exists and belongs to the training run in {run}; replacing "
                             "it would change what that run resumes with. Write elsewhere, or pass --force")
        if files is not None and target.is_dir():
            raise ValueError(f"{arg} {path}: {target} is a directory, but the command writes a file there")
        for name, source in (inputs or {}).items():
            # an input that does not exist yet cannot be destroyed (and fails later on its own)
            if source is not None and target.exists() and os.path.exists(source) and os.path.samefile(target, source):
                raise ValueError(f"{arg} {target} is the same file as {name}; refusing to overwrite an input")
    return path


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
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a {kind} file")
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
