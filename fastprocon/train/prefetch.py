"""Host work off the training thread: the next steps' batches prepared by a background thread.

:class:`Prefetcher` calls ``prepare(i)`` for the indices it is given, in their order, on one
worker thread, at most ``depth`` items ahead of the consumer (a bounded queue, as torchtitan's and
DataLoader's pinned-memory threads do). The consumer takes them with :meth:`Prefetcher.get` in the
same order, so what it gets is exactly what calling ``prepare`` itself would give: the order of
the work is unchanged, only its thread. What the worker does must not touch the device (the
trainer's copy to the device stays on the training thread) nor share mutable state with it.

An exception in ``prepare`` ends the worker; :meth:`~Prefetcher.get` raises that same exception
object (type and message unchanged) on the consumer's thread, when it reaches the failed index.
Leaving the ``with`` block (the last step, a stop signal, an error) stops the worker: it finishes
the item it is preparing, puts nothing more, and is joined.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")

_POLL_S = 0.1     # how often a worker blocked on a full queue looks at the stop flag


class Prefetcher(Generic[T]):
    """``prepare(i)`` for each i of ``indices`` on a worker thread, ``depth`` >= 1 items ahead;
    ``on_start`` runs first on that thread (e.g. to set its CUDA device)."""

    def __init__(self, prepare: Callable[[int], T], indices: Iterable[int], *, depth: int = 2,
                 on_start: Callable[[], None] | None = None, name: str = "fastprocon-prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._prepare, self._indices, self._on_start = prepare, list(indices), on_start
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._next = 0                                   # position in indices of the next get
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._started = False

    def __enter__(self) -> "Prefetcher[T]":
        self._thread.start()
        self._started = True
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _work(self) -> None:
        for index in self._indices:
            if self._stop.is_set():
                return
            try:
                if self._on_start is not None and index == self._indices[0]:
                    self._on_start()   # e.g. the thread's CUDA device
                item = (index, self._prepare(index), None)
            except BaseException as error:   # handed to the consumer, raised there
                item = (index, None, error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def get(self, index: int) -> T:
        """The item of ``index``, which must be the next of ``indices`` (a RuntimeError otherwise)."""
        if not self._started:
            raise RuntimeError("Prefetcher.get outside its `with` block")
        if self._next >= len(self._indices) or self._indices[self._next] != index:
            expected = self._indices[self._next] if self._next < len(self._indices) else "none (all taken)"
            raise RuntimeError(f"prefetched items are taken in order: asked for {index}, the next is {expected}")
        while True:
            try:
                _, item, error = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the prefetch worker ended before preparing item {index}") from None
        self._next += 1
        if error is not None:
            raise error
        return item

    def close(self) -> None:
        """Stop the worker and wait for it (it finishes the item in hand); idempotent."""
        self._stop.set()
        while True:   # free a worker blocked on a full queue at once
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._started and self._thread is not threading.current_thread():
            self._thread.join()
