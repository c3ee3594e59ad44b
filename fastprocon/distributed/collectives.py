"""Collectives the trainer and the tools share: barrier, sum, broadcast, rank-0-then-share and
every rank's first error.

Each works in one process with or without a process group (then it is the plain local call), so
code written for torchrun runs unchanged in a notebook or a test.
"""
from __future__ import annotations

import itertools
import pickle
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

T = TypeVar("T")


def _world_size() -> int:
    """Processes in the default group; 1 when there is none."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all processes (a no-op copy on one process); returns ``tensor``."""
    if _world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every process."""
    box = [obj]
    if _world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


_store_calls = itertools.count()   # every rank calls on_main(wait=...) in the same order: a fresh store key per call


def on_main(fn: Callable[[], T], *, wait: timedelta | None = None, tag: str = "") -> T:
    """``fn()`` run on rank 0 only; its result on every process, or its exception raised on every
    process (a check that fails on rank 0 then stops all ranks instead of leaving them waiting in
    the next collective). One process (or no process group): just ``fn()``.

    The other ranks wait for rank 0 in a broadcast (a collective, so the process group's timeout
    applies, 10-30 minutes), or with ``wait`` on the process group's store for up to that long
    and in no collective (for work that may take longer: tokenizing a data set); ``tag`` names
    the store key. Rank 0 raises its own exception; the others get a copy, or a RuntimeError
    with its text when it cannot be pickled (an unpicklable result is such an error everywhere).
    """
    if _world_size() == 1:
        return fn()
    key = f"fastprocon.on_main/{tag}/{next(_store_calls)}" if wait is not None else None
    if dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as err:
            outcome = (False, err)
        payload, outcome = _payload(outcome)
        if key is None:
            broadcast_object(payload)
        else:
            _get_default_store().set(key, payload)
        ok, value = outcome
    else:
        if key is None:
            payload = broadcast_object(None)
        else:
            store = _get_default_store()
            store.wait([key], wait)
            payload = store.get(key)
        ok, value = pickle.loads(payload)
    if not ok:
        raise value
    return value


def _payload(outcome: tuple[bool, object]) -> tuple[bytes, tuple[bool, object]]:
    """(what rank 0 sends, what rank 0 itself returns or raises): the pickled ``outcome`` and
    ``outcome``; when it cannot be pickled, a RuntimeError with its text is sent instead (and
    raised on rank 0 too when it was a result: every rank then fails alike)."""
    try:
        return pickle.dumps(outcome), outcome
    except Exception as err:
        ok, value = outcome
        if ok:
            error = RuntimeError(f"rank 0's result cannot be sent to the other processes ({type(err).__name__}: {err})")
            return pickle.dumps((False, error)), (False, error)
        return pickle.dumps((False, RuntimeError(f"{type(value).__name__}: {value}"))), outcome


def first_error(error: str | None) -> str | None:
    """The first (lowest rank's) non-None ``error`` of all processes, on every process: each
    process passes its own (None when it succeeded), so a failure on any rank stops every rank."""
    errors = [error] * _world_size()
    if len(errors) > 1:
        dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)
