"""Model specs to Hugging Face directories, and the weights of such a directory loaded straight
into this process's shards (torchtitan's start-up: no full copy of the model on any process).

:func:`build_model` (the recipe; docs/scale.md):

1. build the model on the meta device from ``config.json`` (no memory, no init);
2. ``wrap(model)``: the caller's LoRA / activation checkpointing / ``fully_shard`` (still meta);
3. ``to_empty(device)``, then rebuild the non-persistent buffers (rotary ``inv_freq``, Gemma's
   ``embed_scale``), which ``to_empty`` leaves as garbage, with the model's own ``_init_weights``
   as ``from_pretrained`` does;
4. map the file tensors to the model's by transformers' own conversion rules (renamed keys such
   as GPT-NeoX's ``embed_out``; per-expert tensors fused into one, :mod:`fastprocon.models.conversion`);
5. ``dcp.load`` with ``HuggingFaceStorageReader``: each process reads only the slices of its own
   shards from the (memory-mapped) safetensors files, converting dtype on the way (bf16 files
   into fp32 master weights); fused tensors are converted by transformers' ``WeightConverter``
   from what each process reads (a fused expert tensor: only its experts); tied embeddings are
   loaded once; PEFT names map to the file's; LoRA adapters (not in the files) get PEFT's
   default init from ``seed``, the same values whatever the process count.

Every file is checked against the model before anything is read (a missing tensor, a wrong
shape, a truncated file), so bad input is one line naming the file and the tensor.

Model specs are resolved to such directories by :mod:`fastprocon.models.specs`.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastprocon.models.conversion import (
    conversion_rules,
    converter_targets,
    load_converted,
    local_slice,
    plan_conversion,
    shard_of,
    shard_offset,
)
from fastprocon.utils.mapped import read_safetensors_header

__all__ = ["build_model", "load_weights", "init_lora", "local_slice", "shard_of", "shard_offset", "NotShardable",
           "weight_files", "read_header", "checkpoint_name", "first_line", "LORA_PARAM"]

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
LORA_PARAM = re.compile(r"\.lora_(A|B)\.")                # PEFT adapter weights: not in the files


# ---------------------------------------------------------------------------------------------
# Safetensors headers: which file holds which tensor, checked before anything is loaded
# ---------------------------------------------------------------------------------------------

def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: those its index names, else model.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object): "
                             f"{first_line(err)}") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names {missing[0]}, which is missing from {directory}")
        return [directory / n for n in names]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def read_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of one safetensors file, with the file's
    size checked against the header (a truncated file names the first tensor it cuts)."""
    size = path.stat().st_size
    n, header = read_safetensors_header(path)
    header.pop("__metadata__", None)
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][1]):
        end = 8 + n + info["data_offsets"][1]
        if end > size:
            raise ValueError(f"{path}: truncated: tensor '{name}' ends at byte {end} but the file has {size} bytes")
    return header


def checkpoint_name(key: str) -> str:
    """The file's name for a state-dict key of the (PEFT / checkpoint-wrapped / compiled) model."""
    key = key.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    key = key.removeprefix("base_model.model.")
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


# ---------------------------------------------------------------------------------------------
# Build on meta, wrap, materialise, load
# ---------------------------------------------------------------------------------------------

class NotShardable(ValueError):
    """This architecture's checkpoint cannot be read straight into a meta-device build: file tensors
    that transformers' conversion rules do not map to model tensors, or buffers that neither the
    model's own ``_init_weights`` nor a rebuild from the config restores after ``to_empty``. The
    message says which; load it with ``from_pretrained``."""


def build_model(directory: Path, *, dtype: torch.dtype, device: torch.device, attn_implementation: str,
                wrap: Callable[[nn.Module], nn.Module] | None = None, seed: int = 0) -> nn.Module:
    """The model of ``directory`` with its weights, in ``dtype`` on ``device``, after ``wrap``
    (applied on the meta device; may add LoRA, checkpoint wrappers and ``fully_shard``).

    With FSDP each process reads only its own shards; checkpoints that transformers converts
    while loading (renamed keys, per-expert tensors fused) are converted by transformers' own
    rules as they are read (:mod:`fastprocon.models.conversion`). Not collective: every process
    reads the files itself, so an error in one process cannot leave the others waiting.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    files = weight_files(directory)
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"cannot load the model in {directory}: {first_line(err)}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    base, rules = model, conversion_rules(model)
    stored = stored_tensors(directory, files)
    plan = plan_conversion(stored, model.state_dict(), rules, model.base_model_prefix)
    if plan.unexpected:   # before any memory is taken: from_pretrained decides what such tensors mean
        raise NotShardable(f"{len(plan.unexpected)} file tensors such as '{plan.unexpected[0]}' fill no tensor of "
                           f"{type(model).__name__}, even by transformers' conversion rules")
    model = wrap(model) if wrap is not None else model
    ties = shared_parameters(model)
    model.to_empty(device=device)
    for (module, name), *others in ties:   # to_empty gives each module its own copy: tie them again
        for other, other_name in others:
            other._parameters[other_name] = module._parameters[name]
    restore_buffers(model, base, device)
    load_weights(model, directory, files, seed=seed, stored=stored, plan=plan, base=base)
    return model


def shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, attribute) that hold the same parameter (tied embeddings), two or more each."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, name))
    return [group for group in holders.values() if len(group) > 1]


def restore_buffers(model: nn.Module, base: nn.Module, device: torch.device) -> None:
    """Rebuild the non-persistent buffers (rotary ``inv_freq``, Gemma's ``embed_scale``) that
    ``to_empty`` left uninitialised, as ``from_pretrained`` does: the transformers model ``base``'s
    own ``_init_weights`` on each module holding some, with every parameter and persistent buffer
    flagged as loaded (transformers' init functions then leave them alone; the weights are loaded
    afterwards anyway). A buffer it leaves unset (NaN before, NaN after) is rebuilt by making its
    module afresh from the config where that module is parameter-free, else refused. Without
    transformers' guarded init functions (transformers < 5) only that rebuild is used."""
    try:
        from transformers import initialization as init
    except ImportError:
        init = None
    holders = [(parent, name, module) for parent in list(model.modules()) for name, module in parent.named_children()
               if any(module._buffers.get(b) is not None for b in module._non_persistent_buffers_set)]
    if not holders:
        return
    non_persistent = {id(module._buffers[b]) for _, _, module in holders for b in module._non_persistent_buffers_set
                      if module._buffers.get(b) is not None}
    with torch.no_grad():
        for _, _, module in holders:
            for b in module._non_persistent_buffers_set:
                if module._buffers.get(b) is not None and module._buffers[b].is_floating_point():
                    module._buffers[b].fill_(float("nan"))
    if init is not None:
        flagged = [t for t in (*model.parameters(), *model.buffers())
                   if id(t) not in non_persistent and not getattr(t, "_is_hf_initialized", False)]
        for tensor in flagged:
            tensor._is_hf_initialized = True
        try:
            with torch.no_grad(), init.guard_torch_init_functions():
                for _, _, module in holders:
                    try:
                        base._init_weights(module)
                    except Exception:  # noqa: BLE001  (its buffers stay NaN: rebuilt or refused below)
                        pass
        finally:
            for tensor in flagged:
                del tensor._is_hf_initialized
    for parent, name, module in holders:
        unset = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None
                 and (not module._buffers[b].is_floating_point() or bool(module._buffers[b].isnan().any()))]
        if not unset:
            continue
        config = getattr(module, "config", None)
        if config is None or next(module.parameters(), None) is not None or next(module.children(), None):
            raise NotShardable(f"the buffers {unset} of {type(module).__name__} are not set by "
                               f"{type(base).__name__}._init_weights and cannot be rebuilt from the config")
        with torch.device(device):
            setattr(parent, name, type(module)(config))


def stored_tensors(directory: Path, files: list[Path]) -> dict[str, tuple[Path, dict]]:
    """{file tensor name: (its file, its header entry)} over the model's safetensors ``files``, every
    ``*.safetensors`` of ``directory`` checked readable first (the storage reader opens them all:
    an export's directions file too), so a damaged header is named here in one line."""
    from safetensors import safe_open

    stored: dict[str, tuple[Path, dict]] = {}
    for path in files:
        for name, info in read_header(path).items():
            stored[name] = (path, info)
    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:
            raise ValueError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
    return stored


def load_weights(model: nn.Module, directory: Path, files: list[Path], *, seed: int = 0,
                 stored: dict[str, tuple[Path, dict]] | None = None, plan=None, base: nn.Module | None = None) -> None:
    """Fill every parameter and persistent buffer of ``model`` (plain or FSDP-sharded) from the
    safetensors ``files``; LoRA adapters get their default init from ``seed``. ``plan``: which
    file tensor fills which model tensor (:func:`fastprocon.models.conversion.plan_conversion`
    on ``base``, the transformers model before wrapping; made here from ``model`` when None):
    one-to-one tensors (renamed or not) are read by ``dcp.load`` (each process only its slices),
    converted ones by :func:`fastprocon.models.conversion.load_converted`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException

    stored = stored if stored is not None else stored_tensors(directory, files)
    state = model.state_dict(keep_vars=True)
    fresh = [key for key in state if LORA_PARAM.search(key)]
    targets = {checkpoint_name(key): tensor for key, tensor in state.items() if not LORA_PARAM.search(key)}
    base = base if base is not None else model
    if plan is None:
        plan = plan_conversion(stored, targets, conversion_rules(base), getattr(base, "base_model_prefix", None))
        if plan.unexpected:
            raise NotShardable(f"{len(plan.unexpected)} file tensors such as '{plan.unexpected[0]}' fill no model "
                               "tensor, even by transformers' conversion rules")
    to_load, loaded_ids = {}, set()
    for name, key in plan.direct.items():
        path, info = stored[key]
        tensor = targets[name]
        if list(info["shape"]) != list(tensor.shape):
            raise ValueError(f"{path}: tensor '{key}' has shape {info['shape']} but the model of {directory} "
                             f"(config.json) expects {list(tensor.shape)}" + (f" for '{name}'" if name != key else ""))
        to_load[key] = tensor.detach()
        loaded_ids.add(id(tensor))
    for first, converter in plan.converted.items():
        loaded_ids.update(id(targets[name]) for name in converter_targets(first, converter))
    for name, tensor in targets.items():   # tied weights (lm_head = embed_tokens) are loaded once
        if id(tensor) not in loaded_ids:
            where = files[0] if len(files) == 1 else directory / INDEX_FILE
            raise ValueError(f"{where}: no tensor '{name}' (shape {list(tensor.shape)}) for the model of {directory}")
    try:
        with warnings.catch_warnings():   # no_dist: each process plans its own reads (no collective)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(to_load, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=True)
    except (CheckpointException, Exception) as err:   # CheckpointException is a BaseException
        raise ValueError(f"cannot load the weights in {directory}: {first_line(err)}") from None
    _refuse_non_finite(to_load, stored)
    load_converted(plan, targets, stored, base)
    init_lora(model, fresh, seed)


def _refuse_non_finite(loaded: dict[str, torch.Tensor], stored: dict[str, tuple[Path, dict]]) -> None:
    """ValueError naming the file and tensor of the first NaN/inf weight this process read (a
    damaged model would only show as a NaN loss at step 1). Not collective, as the loading: a
    process of a group raises for its own shards (torchrun then stops the others)."""
    bad = next((name for name, tensor in loaded.items()
                if tensor.is_floating_point() and not bool(torch.isfinite(local_slice(tensor)).all())), None)
    if bad is not None:
        raise ValueError(f"{stored[bad][0]}: tensor '{bad}' has non-finite values (NaN or inf): the model's weights "
                         "are damaged; load them again from their source")


def init_lora(model: nn.Module, keys: list[str], seed: int) -> None:
    """PEFT's default LoRA init (A: kaiming-uniform with a = sqrt(5), B: zeros) for the state-dict
    ``keys``, drawn in key order from ``seed`` as full tensors and copied into each process's shard,
    so the values do not depend on the process count."""
    if not keys:
        return
    state = model.state_dict(keep_vars=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in keys:
            param = state[key]
            full = torch.zeros(param.shape, dtype=torch.float32)
            if ".lora_A." in key:
                nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
            local_slice(param).copy_(shard_of(param, full))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
