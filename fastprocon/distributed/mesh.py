"""The device mesh of a run: plain FSDP (one dimension, every process holds a shard of every
parameter) or HSDP (two dimensions, replicate x shard: parameters sharded within groups of
``shard`` processes, e.g. one node, and replicated across the ``replicate`` groups, so the
per-layer all-gathers stay inside a group and only the gradient all-reduce crosses groups).

Processes are laid out row-major: ranks ``g * shard ... (g + 1) * shard - 1`` form shard group
``g`` (with torchrun's node-major ranks, a group per node when ``shard`` = processes per node).
"""
from __future__ import annotations

import torch


def mesh_shape(replicate: int, shard: int, world_size: int) -> tuple[int, int]:
    """(replicate, shard) for config ``parallel.replicate`` / ``parallel.shard`` (0 = the
    processes left, world_size / replicate) on ``world_size`` processes; a ValueError in one
    line when they do not multiply to it."""
    if replicate < 1 or shard < 0:
        raise ValueError(f"config parallel.replicate = {replicate}, parallel.shard = {shard}: replicate must be >= 1 "
                         "and shard >= 1 (or 0: the processes left)")
    if shard == 0:
        if world_size % replicate:
            raise ValueError(f"config parallel.replicate = {replicate} does not divide the {world_size} process(es) "
                             "of this run; set parallel.replicate to a divisor of the process count")
        shard = world_size // replicate
    if replicate * shard != world_size:
        raise ValueError(f"config parallel.replicate x parallel.shard = {replicate} x {shard} = {replicate * shard} "
                         f"processes, but this run has {world_size}; make their product the process count "
                         "(or set parallel.shard = 0)")
    return replicate, shard


def training_mesh(replicate: int, shard: int, world_size: int, device: torch.device):
    """The mesh to give ``fully_shard``: None for plain FSDP (replicate = 1: FSDP2's default
    one-dimensional mesh over all processes), else a 2-D DeviceMesh ("replicate", "shard") for HSDP.
    Collective when it makes a mesh (every process must call it)."""
    replicate, shard = mesh_shape(replicate, shard, world_size)
    if replicate == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
