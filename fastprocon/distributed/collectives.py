"""Collectives the trainer and the tools share: barrier, sum, broadcast, and rank-0-then-share."""
from __future__ import annotations

import pickle

import torch
import torch.distributed as dist


def barrier() -> None:
    dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all processes (a no-op copy on one process); returns ``tensor``."""
    if dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every process."""
    box = [obj]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn):
    """``fn()`` run on rank 0 only; its result on every process, or its exception raised on every
    process (a check that fails on rank 0 then stops all ranks instead of leaving them waiting in
    the next collective)."""
    outcome = None
    if dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as err:
            outcome = (False, err)
            if dist.get_world_size() > 1:
                try:
                    pickle.dumps(err)
                except Exception:   # an exception that cannot travel: send its text
                    outcome = (False, RuntimeError(f"{type(err).__name__}: {err}"))
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value
