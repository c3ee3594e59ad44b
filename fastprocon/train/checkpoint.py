"""Crash-safe checkpoints through ``torch.distributed.checkpoint`` (DCP), and the final export.

Layout under ``<run dir>/checkpoints``::

    step_000020/          model + optimizer (DCP shards and .metadata), trainer_state.json,
                          rng_rank<r>.pt (each process's RNG states), manifest.json (sha256
                          and size of every other file)
    latest                text: the directory name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step_000020`` by every process; once all have finished,
rank 0 hashes the files into its manifest (atomically), renames it into place, and only then
replaces ``latest`` (atomically). A crash at any moment leaves ``latest`` naming a complete
checkpoint; leftover ``.tmp-*`` directories are removed at the next start. Before a resume the
checkpoint is verified against its manifest: a damaged one (bytes changed, file missing, no
manifest) is named and the newest intact earlier checkpoint is used instead, or the run stops
when there is none. Pruning only deletes checkpoints older than the one just written (which
was hashed from disk a moment before), so the newest intact checkpoint always survives. DCP
reshards on load, so a run may resume on a different number of processes. A checkpoint is
resumed only when its model and batch plan match the config (checked from trainer_state.json
before anything is loaded); an unreadable one is an error naming it and the previous complete
checkpoint. ``<run dir>/.lock`` (:class:`RunLock`) keeps a second run out.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from fastprocon.distributed.collectives import barrier, first_error, on_main
from fastprocon.distributed.process import DistContext
from fastprocon.train.resume_changes import check_changes, config_changes, recorded_config
from fastprocon.utils.checksums import verify_manifest, write_manifest
from fastprocon.utils.io import atomic_path, naming

LATEST = "latest"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
# trainer-state keys that must match this config to resume (the batch plan and the model)
_DATA_KEYS = ("dataset_hash", "batch_size", "seed")
_MODEL_KEYS = {"model": "model", "model_fingerprint": "model fingerprint", "lora": "model.lora"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names it and the checkpoint to use instead."""


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.lock``, held by rank 0 for the whole run, so a
    second run in the same directory fails at once instead of mixing checkpoints and metrics.
    :meth:`acquire` is collective (every rank learns whether rank 0 got it)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> None:
        on_main(self._take)

    def _take(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise ValueError(f"run directory {self.path.parent} is in use (lock {self.path}"
                               f"{', held by process ' + holder if holder else ''}); wait for that run to end "
                               "or use another run_dir") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        """Drop the lock (closing the file releases it); a no-op when not held."""
        if self._file is not None:
            self._file.close()
            self._file = None


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and finds checkpoints of one run. Every method is collective (call on all ranks)."""

    def __init__(self, root: Path, ctx: DistContext, keep: int):
        self.root, self.ctx, self.keep = Path(root), ctx, keep

    def clean_partial(self) -> list[str]:
        """Remove ``.tmp-*`` directories left by an interrupted save; returns their names."""
        def remove() -> list[str]:
            removed = []
            for tmp in sorted(self.root.glob(TMP_PREFIX + "*")) if self.root.is_dir() else []:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp.name)
            return removed
        return on_main(remove)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or None when there is none yet."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        if not name:
            raise CheckpointError(f"{pointer} is empty (an interrupted write?); {_way_out(self.root, None)}")
        target = self.root / name
        if not (target / STATE_FILE).is_file():
            raise FileNotFoundError(f"{pointer} names {target.name}, which is missing or incomplete "
                                    f"(no {STATE_FILE}); {_way_out(self.root, target)}")
        return target

    def plan_resume(self, choice: str, model: dict, data: dict,
                    config: dict | None = None) -> tuple[Path, dict, str | None] | None:
        """(checkpoint, its trainer state, a note or None) to resume from for ``checkpoint.resume =
        choice``, verified against its checksum manifest and checked against this run's ``model``
        and ``data`` identity (see :func:`check_resumable`) before anything is loaded; None = a
        fresh start; ``config`` (``Config.to_dict()``) is checked against the checkpoint's
        (see :func:`check_resumable`). With "auto", a damaged latest checkpoint gives way to the newest intact
        earlier one (the note says so); an explicit damaged path is an error. Run on rank 0."""
        if choice == "never":
            self._refuse_existing_run()
            return None
        path = self.latest() if choice == "auto" else Path(choice)
        if path is None:
            return None
        if choice != "auto" and not path.is_dir():   # a typo: its parent is no run of ours to remove
            raise CheckpointError(f"checkpoint.resume = '{path}': no such checkpoint directory")
        note = None
        problem = verify_manifest(path) if (path / STATE_FILE).is_file() else None   # else read_state names it
        if problem is not None:
            intact = self.newest_intact(before=path) if choice == "auto" else None
            if intact is None:
                if choice == "auto":
                    way = f"no earlier checkpoint is intact: remove {self.root} to start over, or use another run_dir"
                else:
                    way = _way_out(self.root, path)
                raise CheckpointError(f"checkpoint {path} is damaged ({problem}); {way}")
            note = f"checkpoint {path} is damaged ({problem}); resuming from the newest intact one, {intact}"
            path = intact
        state = read_state(path)
        check_resumable(path, state, model, data, config)
        return path, state, note

    def newest_intact(self, before: Path) -> Path | None:
        """The newest complete checkpoint older than ``before`` that passes its manifest, or None."""
        for candidate in reversed(complete_checkpoints(self.root)):
            if candidate.name < Path(before).name and verify_manifest(candidate) is None:
                return candidate
        return None

    def _refuse_existing_run(self) -> None:
        """resume = 'never' in a directory that already holds a run would wipe its metrics and mix
        its checkpoints with the new ones (and pruning would delete the wrong ones)."""
        run_dir = self.root.parent
        steps = sorted(self.root.glob("step_*")) if self.root.is_dir() else []
        metrics = run_dir / "metrics.jsonl"
        if steps or (self.root / LATEST).is_file() or metrics.is_file():
            what = f"checkpoints (newest {steps[-1]})" if steps else str(metrics if metrics.is_file() else self.root)
            raise ValueError(f"checkpoint.resume = 'never' but run directory {run_dir} already holds a run: {what}; "
                             f"pick another run_dir, or remove {run_dir} to start over there")

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        """Write checkpoint ``step``: model and optimizer (sharded), ``trainer_state`` (JSON-able
        dict: step, scheduler, data position...), per-rank RNG; then point ``latest`` at it."""
        name = step_dir_name(step)
        final, tmp = self.root / name, self.root / (TMP_PREFIX + name)
        on_main(lambda: (self.root.mkdir(parents=True, exist_ok=True), shutil.rmtree(tmp, ignore_errors=True)))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        try:
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        except CheckpointException as err:   # a read-only or full disk: raise the OSError that names the file
            cause = _first_failure(err)
            if isinstance(cause, OSError):
                with naming(tmp):            # a failed write names no file: the checkpoint then
                    raise cause from None
            if isinstance(cause, RuntimeError) and "unexpected pos" in str(cause):   # torch's zip writer, short
                raise OSError(errno.EIO, "a write came up short (a full disk?)", str(tmp)) from None
            raise
        rng_file, buffer = tmp / f"rng_rank{self.ctx.rank}.pt", io.BytesIO()
        torch.save(rng_state(), buffer)      # written by us: a full disk is an OSError, not torch's RuntimeError
        with naming(rng_file):
            rng_file.write_bytes(buffer.getvalue())
        if self.ctx.is_main:
            state = {**trainer_state, "step": step, "world_size": self.ctx.world_size}
            with naming(tmp / STATE_FILE):
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        barrier()   # every shard is on disk before the manifest and the rename
        on_main(lambda: (write_manifest(tmp), self._publish(tmp, final)))   # every rank returns after `latest` moved
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename ``tmp`` to ``final``, then replace ``latest``, then prune old checkpoints."""
        if final.exists():   # left by a run that crashed before updating `latest`: not the current one
            shutil.rmtree(final)
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        with atomic_path(self.root / LATEST) as t:
            with open(t, "w") as f:
                f.write(final.name + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(t, 0o644)   # the temp file is created private
        # only older ones: a newer leftover (a damaged checkpoint this run resumed behind) must not
        # count against `keep`, or it could push out the intact ones
        older = [p for p in complete_checkpoints(self.root) if p.name < final.name]
        for old in older[:max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load model and optimizer from checkpoint ``path`` in place (resharding as needed) and
        restore this rank's RNG when the process count is the same (``state``: its trainer state,
        from :func:`read_state`). Any failure, on any rank, is a :class:`CheckpointError` naming
        ``path`` on every rank."""
        path = Path(path)
        error = None
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            sd = {"model": model_sd, "optim": optim_sd}
            dcp.load(sd, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            rng_file = path / f"rng_rank{self.ctx.rank}.pt"
            if state.get("world_size") == self.ctx.world_size and rng_file.is_file():
                try:
                    set_rng_state(torch.load(rng_file, weights_only=False))
                except Exception as err:
                    raise ValueError(f"{rng_file.name}: {err}") from err
        except (Exception, CheckpointException) as err:   # DCP's error is a BaseException
            error = _first_line(err)
        bad = first_error(error)   # the RNG file is per rank: every rank learns of any failure
        if bad is not None:
            raise CheckpointError(_unreadable(path, bad))


def read_state(path: Path) -> dict:
    """The trainer state of checkpoint ``path``: a :class:`CheckpointError` naming the checkpoint
    (and the one to use instead) when it is missing or unreadable."""
    path = Path(path)
    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(_unreadable(path, f"no {STATE_FILE}: not a complete checkpoint"))
    try:
        state = json.loads(file.read_text())
        for key in ("step", "scheduler", "data", "world_size"):
            state[key]   # noqa: B018 (a KeyError/TypeError names a missing key)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(_unreadable(path, f"{STATE_FILE}: {type(err).__name__}: {err}")) from err
    return state


def check_resumable(path: Path, state: dict, model: dict, data: dict, config: dict | None = None) -> None:
    """ValueError unless checkpoint ``path`` (trainer ``state``) was trained with this ``model``
    identity (spec, fingerprint, LoRA; keys an older checkpoint lacks are not compared), with a
    config (``Config.to_dict()``) that differs only where train/resume_changes.py allows, and the
    same batch plan (``data``: dataset hash, batch size, seed)."""
    fix = "use checkpoint.resume = 'never' and another run_dir"
    for key, label in _MODEL_KEYS.items():
        if key in state and state[key] != model[key]:
            raise ValueError(f"cannot resume from {path}: it was trained with {label} {state[key]!r}, this config "
                             f"gives {model[key]!r}; {fix}")
    recorded = recorded_config(path, state) if config is not None else None
    if recorded is not None:
        check_changes(path, config_changes(recorded, config), config["checkpoint"]["resume_changes"])
    for key in _DATA_KEYS:
        if state["data"].get(key) != data[key]:
            raise ValueError(f"cannot resume from {path}: it was trained with {key} = {state['data'].get(key)!r}, "
                             f"this config gives {data[key]!r} (the data order would differ); {fix}")


def check_same_inputs(path: Path, state: dict, inputs: dict | None, run_dir: Path | None = None) -> None:
    """ValueError unless the ProCon inputs recorded in checkpoint ``path``'s trainer ``state``
    (directions and reference cache: path and hash, and the sha256 of every file of the cache, see
    ``Trainer._procon_inputs``) are the ones this run has now (for a checkpoint outside ``run_dir``,
    another run's, the files it was trained with are named); a checkpoint without that record, or a run without ProCon,
    is not compared."""
    recorded = state.get("procon_inputs")
    if not recorded or not inputs:
        return
    fix = ("put the original file back, or start a new run (another run_dir, or checkpoint.resume = 'never' "
           "in a fresh one)")
    # a checkpoint of another run directory (resume = its path): its inputs are that run's files
    another_run = run_dir is not None and Path(path).resolve().parent.parent != Path(run_dir).resolve()
    for what, key, setting in (("directions", "directions_hash", "procon.directions"),
                               ("reference cache", "reference_sha256", "procon.reference_cache")):
        then, now = recorded.get(what.split()[0]), inputs.get(what.split()[0])
        if recorded.get(key) != inputs.get(key) and then and now and Path(then) != Path(now) and another_run:
            raise ValueError(f"cannot resume from {path}: it was trained with the {what} {then}, this run has "
                             f"{now} (another run's checkpoint?); to go on from it set {setting} = '{then}', or "
                             "start this run from scratch (checkpoint.resume = 'auto' or 'never')")
        if recorded.get(key) != inputs.get(key):
            file = inputs.get(what.split()[0]) or recorded.get(what.split()[0])
            raise ValueError(f"cannot resume from {path}: the {what} {file} changed since the run started "
                             f"({key} {str(recorded.get(key))[:12]}... then, {str(inputs.get(key))[:12]}... now; "
                             f"replaced by a tool such as `fastprocon directions --out`?); {fix}")
    before, now = recorded.get("reference_files"), inputs.get("reference_files")
    if before and now is not None:   # a checkpoint from before per-file hashes has only the index's
        for name in sorted(set(before) | set(now)):
            if before.get(name) != now.get(name):
                raise ValueError(f"cannot resume from {path}: the reference cache {inputs.get('reference')} changed "
                                 f"since the run started ({name}: sha256 {str(before.get(name))[:12]}... then, "
                                 f"{str(now.get(name))[:12]}... now); {fix}")


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints (with a trainer state) in ``root``, oldest first."""
    return sorted(p for p in Path(root).glob("step_*") if (p / STATE_FILE).is_file())


def _way_out(root: Path, broken: Path | None) -> str:
    """What to do about an unusable checkpoint (``broken``, or None: the newest one in ``root``)."""
    usable = [p for p in complete_checkpoints(root) if broken is None or p.name < Path(broken).name]
    prev = usable[-1] if usable else None
    if prev is not None:
        which = "previous" if broken is not None else "newest"
        return f"to resume from the {which} complete checkpoint set checkpoint.resume = '{prev}'"
    return f"there is no earlier complete checkpoint: remove {root} to start over, or use another run_dir"


def _unreadable(path: Path, why: str) -> str:
    return f"checkpoint {path} is unreadable ({why}); {_way_out(Path(path).parent, path)}"


def _first_failure(err: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (else ``err`` itself)."""
    if isinstance(err, CheckpointException) and err.failures:   # {rank: (exception, traceback)}
        first = next(iter(err.failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return err


def _first_line(err: BaseException) -> str:
    """A short form of ``err`` (DCP's errors carry whole tracebacks of every rank)."""
    err = _first_failure(err)
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 2:   # a traceback dump: its last line is the real error
        text = f"{lines[0]} ... {lines[-1]}"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def full_model_state_dict(model: nn.Module) -> dict:
    """The unsharded model state dict on CPU, on rank 0 (empty elsewhere). Collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
