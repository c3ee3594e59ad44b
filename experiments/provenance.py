"""Which code produced a result: the experiment driver stamps every stage with this, so that a
report never mixes numbers from two versions of the code.

code_version() -> {"code": sha256 of the files that decide results, "commit": git HEAD or None,
                   "dirty": True when those files differ from HEAD (None without git)}

"code" hashes file contents, not the commit: a commit that only touches the README or the
committed results keeps every finished stage valid, and an uncommitted edit to the trainer does not.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# everything a stage's output depends on, besides the data and the driver's arguments
CODE = ("fastprocon", "kernels", "experiments/configs", "setup.py")
CODE_GLOBS = ("*.py", "*.toml", "*.json")
DRIVER_FILES = ("experiments/procon_smollm2.py", "experiments/task_eval.py", "experiments/projection_drift.py",
                "experiments/powered.py")


def code_files(repo: Path = REPO) -> list[Path]:
    files: set[Path] = {repo / f for f in DRIVER_FILES if (repo / f).is_file()}
    for entry in CODE:
        path = repo / entry
        if path.is_file():
            files.add(path)
        elif path.is_dir():
            files.update(p for g in CODE_GLOBS for p in path.rglob(g) if "__pycache__" not in p.parts)
    return sorted(files)


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version(repo: Path = REPO) -> dict:
    digest = hashlib.sha256()
    for path in code_files(repo):
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--", *CODE, *DRIVER_FILES) if commit else None
    return {"code": digest.hexdigest()[:16], "commit": commit, "dirty": None if status is None else bool(status)}


def describe(version: dict | None) -> str:
    if not version:
        return "an unrecorded code version"
    commit = (version.get("commit") or "no git")[:10]
    return f"code {version['code']} (commit {commit}{', uncommitted changes' if version.get('dirty') else ''})"
