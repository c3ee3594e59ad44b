"""sha256 checksums of files and directories, and the checksum manifest of a checkpoint.

A manifest (``manifest.json`` in the directory it covers) lists every file below that directory
with its size and sha256. :func:`write_manifest` hashes what is on disk (so it must run after
every writer has finished); :func:`verify_manifest` re-hashes and returns the first problem, or
None when every listed file is present with the recorded size and bytes. Files are hashed in a
few threads (hashlib releases the GIL on large buffers), so a multi-file checkpoint is read at
close to the disk's speed.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastprocon.utils.io import write_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fastprocon.checksums"
_BLOCK = 8 << 20
_THREADS = min(8, os.cpu_count() or 1)


def file_sha256(path: str | os.PathLike, block: int = _BLOCK) -> str:
    """sha256 hex digest of one file's bytes, read ``block`` bytes at a time (one buffer of that
    size is all it holds)."""
    digest = hashlib.sha256()
    buffer = bytearray(block)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    """Relative paths (POSIX) of the regular files below ``root``, sorted, without the manifest."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not p.is_symlink() and p.name != MANIFEST)


def _hash_all(root: Path, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        return list(pool.map(lambda name: file_sha256(root / name), names))


def tree_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    names = _files(path)
    digest = hashlib.sha256()
    for name, value in zip(names, _hash_all(path, names)):
        digest.update(f"{name}\0{value}\n".encode())
    return digest.hexdigest()


def write_manifest(root: str | os.PathLike) -> Path:
    """Hash every file below ``root`` and write ``root/manifest.json`` atomically."""
    root = Path(root)
    names = _files(root)
    files = {name: {"bytes": (root / name).stat().st_size, "sha256": value}
             for name, value in zip(names, _hash_all(root, names))}
    return write_json(root / MANIFEST, {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files})


def verify_manifest(root: str | os.PathLike) -> str | None:
    """None when every file ``root/manifest.json`` lists has its recorded size and sha256; else the
    first problem in words (missing or unreadable manifest, missing file, size or checksum mismatch).
    Files not in the manifest are ignored."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            return f"{MANIFEST} is not a checksum manifest"
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (an interrupted write, or a checkpoint from before checksums)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    names = sorted(expected)
    for name in names:
        file = root / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected[name][0]:
            return f"{name} has {size} bytes, the manifest says {expected[name][0]}"
    for name, value in zip(names, _hash_all(root, names)):
        if value != expected[name][1]:
            return f"{name} fails its sha256 checksum (same size, different bytes)"
    return None
