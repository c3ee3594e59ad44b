"""Crash-safe checkpoints through ``torch.distributed.checkpoint`` (DCP), and the final export.

Layout under ``<run dir>/checkpoints``::

    step_000020/          model + optimizer (DCP shards and .metadata), trainer_state.json,
                          rng_rank<r>.pt (each process's RNG states)
    latest                text: the directory name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step_000020`` by every process, then renamed into place
by rank 0, and only then is ``latest`` replaced (atomically). A crash at any moment leaves
``latest`` naming a complete checkpoint; leftover ``.tmp-*`` directories are removed at the
next start. DCP reshards on load, so a run may resume on a different number of processes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from fastprocon.io import atomic_path
from fastprocon.train.distributed import DistContext, barrier, broadcast_object

LATEST = "latest"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"


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
        removed = []
        if self.ctx.is_main and self.root.is_dir():
            for tmp in sorted(self.root.glob(TMP_PREFIX + "*")):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp.name)
        barrier()
        return broadcast_object(removed)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or None when there is none yet."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        target = self.root / pointer.read_text().strip()
        if not (target / STATE_FILE).is_file():
            raise FileNotFoundError(f"{pointer} names {target.name}, which is missing or incomplete "
                                    f"(no {STATE_FILE}); remove {pointer} to start over")
        return target

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        """Write checkpoint ``step``: model and optimizer (sharded), ``trainer_state`` (JSON-able
        dict: step, scheduler, data position...), per-rank RNG; then point ``latest`` at it."""
        name = step_dir_name(step)
        final, tmp = self.root / name, self.root / (TMP_PREFIX + name)
        if self.ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_rank{self.ctx.rank}.pt")
        if self.ctx.is_main:
            state = {**trainer_state, "step": step, "world_size": self.ctx.world_size}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        barrier()   # every shard is on disk before the rename
        if self.ctx.is_main:
            self._publish(tmp, final)
        barrier()
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
        complete = sorted(p for p in self.root.glob("step_*") if (p / STATE_FILE).is_file())
        for old in complete[:-self.keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Load model and optimizer from checkpoint ``path`` in place (resharding as needed),
        restore this rank's RNG when the process count is the same; returns the trainer state."""
        path = Path(path)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        state = json.loads((path / STATE_FILE).read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        rng_file = path / f"rng_rank{self.ctx.rank}.pt"
        if state.get("world_size") == self.ctx.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return state


def full_model_state_dict(model: nn.Module) -> dict:
    """The unsharded model state dict on CPU, on rank 0 (empty elsewhere). Collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
