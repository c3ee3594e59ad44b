"""The process group: one code path for every launch.

One code path for every launch: under ``torchrun`` the usual env:// group (gloo on CPU, nccl on
CUDA); as a plain single process, a 1-rank gloo group over an in-process store (no port, no
launcher). The model is always FSDP2-sharded (sharding.py), so checkpoints have the same
(resharding) format whatever the process count.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool          # this context created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistContext:
    """Join (or create) the default process group and pick this process's device.

    ``device``: "auto" (cuda when available), "cpu" or "cuda". Under torchrun each process takes
    cuda:LOCAL_RANK.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("config model.device = 'cuda' but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            dist.init_process_group(backend, device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def elastic_note() -> str | None:
    """What to say at start under torchrun's elastic agent: a warning when it may restart the
    workers (``--max-restarts`` > 0) while sharing its rendezvous store with them (the c10d
    rendezvous's default): that store keeps the previous attempt's keys, so restarted processes
    can read their peers' old addresses and fail to connect (seen with gloo in torch 2.13); else,
    in a restarted process, that it is one. None otherwise."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restarts > 0:
        return ("warning: torchrun may restart the processes but shares its rendezvous store with them, which "
                "keeps the previous attempt's addresses, so a restart can fail to connect; launch with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment (docs/scale.md)")
    count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if count > 0:
        return f"restarted by torchrun (restart {count}): resuming from the last intact checkpoint"
    return None


def shutdown(ctx: DistContext, *, clean: bool = True) -> None:
    """Destroy the group if this context made it; after a barrier when ``clean`` (the barrier
    avoids teardown aborts), without one after an error (other processes may never reach it).

    Drop the last reference to the FSDP model before calling this: FSDP modules sit in reference
    cycles that hold the group, and a group freed only at interpreter exit can abort the process
    there ("terminate called without an active exception", seen with gloo). The gc.collect()
    here frees those cycles, so the group's threads stop inside destroy_process_group."""
    if ctx.owns_group and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            gc.collect()
            dist.destroy_process_group()


@contextmanager
def tool_processes(args) -> Iterator[bool]:
    """For a tool (directions, drift, eval-refusal): under torchrun (WORLD_SIZE > 1) the process
    group for the whole command (gloo on CPU, nccl on CUDA; ``args.device`` becomes this process's
    GPU), so models load sharded (cli.args.model_from_args); nothing otherwise. Yields whether this
    process writes the outputs (rank 0). Drop the model before the block ends (see shutdown)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield not dist.is_initialized() or dist.get_rank() == 0
        return
    ctx = init_distributed("cuda" if args.device.startswith("cuda") else args.device)
    if ctx.device.type == "cuda":
        args.device = str(ctx.device)
    clean = False
    try:
        yield ctx.is_main
        clean = True
    finally:
        shutdown(ctx, clean=clean)
