"""Process group, FSDP2 sharding and activation checkpointing.

One code path for every launch: under ``torchrun`` the usual env:// group (gloo on CPU, nccl on
CUDA); as a plain single process, a 1-rank gloo group over an in-process store (no port, no
launcher). The model is always FSDP2-sharded, so checkpoints have the same (resharding) format
whatever the process count.
"""
from __future__ import annotations

import gc
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


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
    GPU), so models load sharded (models.model_from_args); nothing otherwise. Yields whether this
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


def apply_activation_checkpointing(layers: nn.ModuleList) -> None:
    """Wrap each decoder layer in a (non-reentrant) checkpoint wrapper, in place.

    Forward pre-hooks installed on the wrappers afterwards run outside the recomputed region.
    State-dict keys are unchanged (the wrapper strips its prefix).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i in range(len(layers)):
        layers[i] = checkpoint_wrapper(layers[i])


def compile_decoder_layers(layers: nn.ModuleList, *, backend: str = "inductor") -> None:
    """``torch.compile(fullgraph=True)`` each decoder layer, in place (torchtitan's way): apply
    after activation checkpointing and before :func:`shard_model`, so FSDP's hooks stay outside
    the compiled regions. Hooks installed afterwards on ``layer._orig_mod`` (steering.on_layer_inputs
    puts them there), the ProCon hooks among them, are compiled too (fullgraph), as a graph of
    their own that runs before the layer's: torch.compile runs a module's hooks ahead of the
    frame it captures. (``torch._dynamo.config.wrap_top_frame`` would put them in the layer's
    graph, but under FSDP2 their side effects, the logged penalty, were then lost: torch 2.13.)
    State-dict keys are unchanged for DCP (``torch.distributed.checkpoint.state_dict`` strips
    ``_orig_mod``)."""
    for i in range(len(layers)):
        layers[i] = torch.compile(layers[i], backend=backend, fullgraph=True)


def use_compile(setting: str, device: torch.device) -> bool:
    """config model.compile: "auto" compiles on CUDA only (on CPU it did not pay, see the README)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def mixed_precision_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Compute dtype for FSDP's MixedPrecisionPolicy: bf16 ("auto" on CUDA, or asked), else None (fp32)."""
    if setting == "bf16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def shard_model(model: nn.Module, layers: nn.ModuleList, param_dtype: torch.dtype | None) -> None:
    """FSDP2: ``fully_shard`` each decoder layer, the untied embeddings, then the root (torchtitan's layout).

    With ``param_dtype`` (bf16) parameters are gathered and computed in it while gradients
    are reduced in fp32 and the sharded master weights stay fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kwargs)
    # untied input and output embeddings as units of their own (torchtitan's layout): each is
    # gathered only around its own use, not for the whole forward with the root (tied ones stay in
    # the root: one parameter belongs to one unit)
    from fastprocon.models import unwrap_model

    base = unwrap_model(model)
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    if embed is not None and head is not None and embed.weight is not head.weight:
        fully_shard(embed, **kwargs)
        fully_shard(head, **kwargs)
    fully_shard(model, **kwargs)
