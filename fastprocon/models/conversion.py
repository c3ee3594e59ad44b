"""transformers' own checkpoint conversion, applied while each process reads only its shards.

``from_pretrained`` renames checkpoint keys (GPT-NeoX ``embed_out`` -> ``lm_head``) and fuses
tensors (a mixture-of-experts checkpoint's per-expert ``experts.{e}.gate_proj.weight`` /
``up_proj.weight`` into one ``experts.gate_up_proj`` of shape [E, 2 I, H]) by the rules of
``transformers.conversion_mapping``. :func:`plan_conversion` maps every file tensor to the model
tensor it fills with those same rules (``rename_source_key``); :func:`load_converted` runs the
fusing ``WeightConverter`` s themselves on what this process reads:

* a fused expert tensor sharded along the expert axis (FSDP2's ``Shard(0)``) whose converter
  stacks per-expert tensors (``MergeModulelist(dim=0)``, then concatenations along other axes):
  each process reads only the experts of its shard (transformers' ``DtensorShardOperation``),
  so no process holds more than its part;
* any other converter (or an unsharded model): its source tensors are read whole, converted,
  and this process keeps its part: one converted tensor at a time, never the whole model.
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class ConversionPlan:
    direct: dict[str, str] = field(default_factory=dict)     # model name -> file tensor name (maybe renamed)
    converted: dict[str, object] = field(default_factory=dict)   # first target -> WeightConverter with its sources
    unexpected: list[str] = field(default_factory=list)     # file tensors that fill no model tensor


def conversion_rules(model: nn.Module) -> list:
    """The ``WeightRenaming`` / ``WeightConverter`` list ``from_pretrained`` applies to ``model``'s
    checkpoints (``model``: the transformers model itself, before any wrapping); none before
    transformers 5, which loaded checkpoints as they are."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    return get_model_conversion_mapping(model)


def plan_conversion(file_tensors, model_tensors: dict[str, torch.Tensor], rules: list,
                    base_model_prefix: str | None) -> ConversionPlan:
    """Which file tensor fills which model tensor, by transformers' ``rename_source_key`` (all
    renamings, then at most one converter), as ``convert_and_load_state_dict_in_model`` does.
    ``model_tensors``: {model state-dict name: tensor}; sources of a converter are collected in
    transformers' order (natural sort: expert 0, 1, ..., 10)."""
    if not rules:   # every file tensor under its own name (and no transformers 5 machinery needed)
        known = [key for key in file_tensors if key in model_tensors]
        return ConversionPlan(direct={key: key for key in known},
                              unexpected=sorted(key for key in file_tensors if key not in model_tensors))
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if isinstance(rule, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    plan = ConversionPlan()
    for key in sorted(file_tensors, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, base_model_prefix, model_tensors)
        if name not in model_tensors and key in model_tensors:   # a name the rules should have left alone
            name, pattern = key, None
        if name not in model_tensors:
            plan.unexpected.append(key)
        elif pattern is None:
            plan.direct[name] = key
        else:   # the file name stands for its tensor until load_converted reads it
            plan.converted.setdefault(name, deepcopy(by_pattern[pattern])).add_tensor(name, key, pattern, key)
    return plan


def converter_targets(first: str, converter) -> list[str]:
    """The model names a converter fills (several for a one-to-many split), from its first."""
    return [first.replace(converter.target_patterns[0], target, 1) for target in converter.target_patterns]


def load_converted(plan: ConversionPlan, model_tensors: dict[str, torch.Tensor], stored: dict[str, tuple[Path, dict]],
                   model: nn.Module) -> None:
    """Fill the model tensors of ``plan.converted`` (plain or DTensor) from the files: the
    sources of each converter read (only this process's experts where the converter allows it),
    converted by transformers' own operations, this process's part copied in. ``stored``:
    {file tensor name: (file, header entry)}; ``model``: the transformers model (``convert``
    passes it and its config to the operations)."""
    handles: dict[Path, object] = {}
    for first, converter in plan.converted.items():
        names = converter_targets(first, converter)
        sources = {pattern: list(keys) for pattern, keys in converter.collected_tensors.items()}
        where = stored[next(iter(sources.values()))[0]][0]
        params = [model_tensors[name] for name in names]
        sharding = shard_on_read(converter, params, [stored[k][1]["shape"] for keys in sources.values() for k in keys])
        if sharding is not None:
            local_experts = local_slice(params[0]).shape[0]
            for pattern, keys in sources.items():
                if len(keys) != params[0].shape[0]:
                    raise ValueError(f"{where}: {len(keys)} tensors match '{pattern}' but '{first}' of the model "
                                     f"has {params[0].shape[0]} experts")
            if local_experts == 0:   # this process holds none of it (more processes than experts)
                continue
        dtype = params[0].dtype
        for pattern, keys in sources.items():
            converter.collected_tensors[pattern] = [_reader(handles, stored[key][0], key, sharding, index, dtype)
                                                    for index, key in enumerate(keys)]
        try:
            with torch.no_grad():
                converted = converter.convert(first, model=model, config=model.config)
        except Exception as err:  # noqa: BLE001  (an operation on tensors of the wrong shape: any error type)
            raise ValueError(f"{where}: cannot convert {sorted(sources)} into '{first}' as transformers does: "
                             f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                             ) from None
        for name, value in converted.items():
            value = value[0] if isinstance(value, list) else value
            param = model_tensors[name]
            local = local_slice(param)
            if sharding is None:   # the whole converted tensor: keep this process's part
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{where}: tensors {sorted(sources)} convert to shape {list(value.shape)} for "
                                     f"'{name}' but the model expects {list(param.shape)}")
                value = shard_of(param, value)
            elif tuple(value.shape) != tuple(local.shape):
                raise ValueError(f"{where}: tensors {sorted(sources)} convert to a shard of shape {list(value.shape)} "
                                 f"for '{name}' but this process's shard is {list(local.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where}: the tensors {sorted(sources)} of '{name}' have non-finite values (NaN or "
                                 "inf): the model's weights are damaged; load them again from their source")
            with torch.no_grad():
                local.copy_(value)


def shard_on_read(converter, params: list[torch.Tensor], source_shapes: list[list[int]]):
    """transformers' ``DtensorShardOperation`` for a converter whose sources are slices of its
    target's first axis (experts) stacked by ``MergeModulelist(dim=0)``, then concatenated along
    later axes only, with the target sharded along that first axis only: reading each process's
    experts and converting them gives exactly its shard. None otherwise (read whole, then slice)."""
    from torch.distributed.tensor import Replicate, Shard
    from transformers.core_model_loading import Concatenate, MergeModulelist
    from transformers.distributed.sharding_utils import DtensorShardOperation

    (param, *more), ops = params, converter.operations
    if more or not hasattr(param, "device_mesh"):
        return None
    if not (type(ops[0]) is MergeModulelist and ops[0].dim == 0
            and all(type(op) is Concatenate and op.dim >= 1 for op in ops[1:])):
        return None
    if not all(isinstance(p, Replicate) or (type(p) is Shard and p.dim == 0) for p in param.placements):
        return None
    if any(len(shape) != param.dim() - 1 for shape in source_shapes):
        return None
    return DtensorShardOperation(param)


def read_part(file_slice, sharding, index: int, dtype: torch.dtype) -> torch.Tensor | None:
    """One source tensor from its safetensors slice: only this process's part of it (None: an
    expert of another process's shard) when ``sharding`` is given, else whole; in ``dtype``."""
    if sharding is not None:
        return sharding.shard_tensor(file_slice, tensor_idx=index, dtype=dtype)
    return file_slice[...].to(dtype)


def _reader(handles: dict, path: Path, key: str, sharding, index: int, dtype: torch.dtype):
    """A deferred read (transformers' converters call it when they convert)."""
    from safetensors import safe_open

    def read():
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return read_part(handles[path].get_slice(key), sharding, index, dtype)
    return read


def local_slice(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor``: the local shard of a DTensor, else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_offset(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this process's part of ``tensor`` (a DTensor or a plain tensor)."""
    if not hasattr(tensor, "device_mesh"):
        return tuple(tensor.shape), (0,) * tensor.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(shape), tuple(offset)


def shard_of(tensor: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (a tensor of ``tensor``'s global shape) that this process holds."""
    shape, offset = shard_offset(tensor)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
