"""A model's fingerprint: one sha256 over its config and exact integer checksums of its weights,
the same across processes, devices, save/load and fp32/bf16 (files made for a model record it)."""
from __future__ import annotations

import hashlib
import json
import math

import torch

from fastprocon.models.layers import unwrap_model
from fastprocon.models.loading import checkpoint_name, local_slice, shard_offset

# Bumped whenever model_fingerprint's definition changes: files that record another version were
# made for "another model" only in name, and are refused with "rebuild it" (never compared).
FINGERPRINT_VERSION = 1

# Config fields that vary with how a model was loaded, not with what it computes
# ("architectures" is filled in by save_pretrained; the model class is hashed instead).
_VOLATILE_CONFIG_KEYS = frozenset({
    "architectures",
    "torch_dtype", "dtype", "_name_or_path", "name_or_path", "transformers_version",
    "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "_experts_implementation", "quantization_config", "use_cache",
})


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex over the model's config and exact integer checksums of every named parameter.

    Each parameter is rounded to bfloat16 (round-to-nearest-even, identical on CPU and GPU) and
    its bit patterns are summed as integers, plain and weighted by position. Integer sums are
    exact and order-free, so the fingerprint is the same across processes, devices, save/load,
    process counts, and for the same weights held in fp32 or bf16 (the two training dtypes).
    Any change that moves some weight across a bf16 rounding boundary (any real training step)
    changes it. The base model's parameters only: LoRA adapters and PEFT's
    ``modules_to_save`` copies are left out and PEFT / checkpoint-wrapper names are mapped back to
    the plain ones. FSDP2-sharded parameters are
    summed shard by shard (each process its own part) with one all-reduce for the whole model.
    """
    base = unwrap_model(model)
    digest = hashlib.sha256()
    digest.update(_config_json(base).encode())
    names, sums, sharded = [], [], False
    with torch.no_grad():
        for key, param in base.named_parameters():
            if ".lora_" in key or ".modules_to_save." in key:   # PEFT's trained copies: not the base model
                continue
            names.append(f"{checkpoint_name(key)}:{tuple(param.shape)}")
            part, offset = _fingerprint_part(param)
            sharded |= hasattr(param, "device_mesh")
            sums.append(_bits_checksums(part.detach(), offset) if part is not None
                        else torch.zeros(2, dtype=torch.int64, device=param.device))
    total = torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.int64)
    if sharded and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)   # integer sums of the shards: exact, any order
    values = total.cpu().tolist()   # one host sync for the whole model
    for name, (plain, weighted) in zip(names, values):
        digest.update(f"{name}={plain},{weighted};".encode())
    return digest.hexdigest()


def check_fingerprint_version(metadata: dict, path, rebuild: str) -> None:
    """A file (directions, reference cache) records the fingerprint version it was made under;
    another version is refused in one line, never compared (files from before the field was
    recorded are version 1: the definition is unchanged since)."""
    found = metadata.get("fingerprint_version", 1)
    if found != FINGERPRINT_VERSION:
        raise ValueError(f"{path} was made for another model version (fingerprint version {found}, this fastprocon "
                         f"uses {FINGERPRINT_VERSION}): rebuild it with {rebuild}")


def _fingerprint_part(param: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """(this process's contiguous part of the flattened parameter or None, its flat offset)."""
    if not hasattr(param, "device_mesh"):
        return param, 0
    shape, offset = shard_offset(param)
    if param.device_mesh.ndim == 1 and all(o == 0 for o in offset[1:]) and tuple(shape[1:]) == tuple(param.shape[1:]):
        return local_slice(param), offset[0] * math.prod(param.shape[1:])   # rows: contiguous
    full = param.full_tensor()   # any other layout: gathered, counted once (by rank 0)
    return (full if torch.distributed.get_rank() == 0 else None), 0


def _config_json(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    as_dict = {} if config is None else {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    from torch.distributed.fsdp import FSDPModule

    # fully_shard swaps the class for a subclass "FSDP<Name>": hash the model's own class
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    return json.dumps({"class": cls.__name__, "config": as_dict}, sort_keys=True, default=str)


_CHUNK = 1 << 22          # elements per checksum chunk: bounds the temporaries to 16 MiB
_WEIGHT_MOD = 65521       # position weights 1..65521: |bits * weight| < 2**31 fits int32
_position_weights: dict[torch.device, torch.Tensor] = {}


def _bits_checksums(tensor: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """[2] int64: sum of the bf16 bit patterns, and their sum weighted by position: element i of
    ``tensor`` (flattened) sits at position ``offset + i`` of the whole parameter, weighted by
    (position mod 2**22) mod 65521 + 1, so shards summed over processes give the whole's value.

    The weighted sum makes the checksum sensitive to permutations (e.g. a transposed weight).
    Products stay in int32; ``sum`` of an int32 tensor accumulates in int64.
    """
    flat = tensor.reshape(-1)
    weights = _position_weights.get(flat.device)
    if weights is None:
        weights = (torch.arange(_CHUNK, device=flat.device) % _WEIGHT_MOD + 1).to(torch.int32)
        _position_weights[flat.device] = weights
    total = torch.zeros(2, dtype=torch.int64, device=flat.device)
    start = 0
    while start < flat.numel():   # pieces that do not cross a multiple of _CHUNK (global positions)
        at = (offset + start) % _CHUNK
        bits = flat[start:start + _CHUNK - at].to(torch.bfloat16).view(torch.int16).to(torch.int32)
        total[0] += bits.sum()
        total[1] += (bits * weights[at:at + bits.numel()]).sum()
        start += bits.numel()
    return total
