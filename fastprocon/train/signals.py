"""Stopping a run cleanly on SIGTERM (a cluster's preemption) or SIGINT (Ctrl-C).

During the training steps a signal only sets a flag: the current optimizer step finishes, the
processes agree on the flag at the step boundary, a checkpoint is written and the run returns
with ``stopped_by`` set (the CLI prints one line and exits with :data:`STOP_EXIT_STATUS`).
Further signals while that happens are ignored (torchrun forwards the one it got, so each
process may see two); SIGKILL still ends a process at once, and the last checkpoint stays good.
Outside the steps (set-up, export) a signal raises :class:`Interrupted` at once: nothing is
half-done there that a rerun would not redo.

Agreement costs no extra host sync on GPU: each step boundary all-reduces (MAX) a one-element
flag on the device and reads the *previous* boundary's result, which the GPU finished long ago
(so every process stops one step after the first one saw the signal, all at the same step).
On CPU (gloo) the tiny all-reduce is read at once; a single process needs no collective.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # not at run time: `fastprocon train --help` imports this module for STOP_EXIT_STATUS
    import torch

# EX_TEMPFAIL (sysexits.h): "temporary failure; the user is invited to retry" -- rerun to resume
STOP_EXIT_STATUS = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A signal outside the training steps (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class StopRequest:
    """The SIGTERM/SIGINT handlers of one run and the flag they set (see the module docstring)."""

    def __init__(self, device: torch.device, *, lagged: bool | None = None):
        self.device = device
        self.lagged = device.type == "cuda" if lagged is None else lagged   # read the previous boundary's flag
        self.signum: int | None = None     # the first signal received while deferring
        self._deferring = False
        self._pending = None                # lagged: (host flag, CUDA event or None) of the previous boundary
        self._buffers = None                # (device flag, two pinned host flags, two events): made once

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGTERM and SIGINT until the block ends (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def deferred(self):
        """Inside the block a signal sets the flag instead of raising."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def _handle(self, signum: int, frame) -> None:
        if not self._deferring:
            raise Interrupted(signum)
        if self.signum is None:
            self.signum = signum
            name = signal.Signals(signum).name
            os.write(2, f"fastprocon train: {name} received: finishing this step, then a checkpoint\n".encode())

    def agreed(self, now: bool = False) -> str | None:
        """At a step boundary, on every process: the name of the signal to stop for, or None.

        Collective when more than one process runs: call it at every boundary on every process.
        ``now``: read this boundary's result at once (a host sync; for the end of the loop)."""
        import torch  # here, not at the top: `fastprocon train --help` reads STOP_EXIT_STATUS
        import torch.distributed as dist

        mine = self.signum or 0
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return _name(mine)
        if not self.lagged or now:
            flag = torch.tensor([mine], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            pending, self._pending = self._pending, None
            if pending is not None:   # a flag from the previous boundary counts too
                if pending[1] is not None:
                    pending[1].synchronize()
                flag = flag.maximum(pending[0].to(self.device))
            return _name(int(flag.max()))
        agreed = None
        if self._pending is not None:    # the previous boundary's flag: done on the GPU by now
            host, event = self._pending
            if event is not None:
                event.synchronize()
            agreed = _name(int(host[0]))
        if self._buffers is None:   # allocated once; the two host copies alternate (one may still be read)
            cuda = self.device.type == "cuda"
            self._buffers = (torch.zeros(1, dtype=torch.int32, device=self.device),
                             [torch.zeros(1, dtype=torch.int32, pin_memory=cuda) for _ in range(2)],
                             [torch.cuda.Event() if cuda else None for _ in range(2)], [0])
        flag, hosts, events, turn = self._buffers
        flag.fill_(mine)                 # a fill: no host-device copy
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        host, event = hosts[turn[0]], events[turn[0]]
        host.copy_(flag, non_blocking=event is not None)
        if event is not None:
            event.record()
        turn[0] ^= 1
        self._pending = (host, event)
        return agreed


def _name(signum: int) -> str | None:
    return signal.Signals(signum).name if signum else None
