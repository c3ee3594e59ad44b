"""Export the trained model as a Hugging Face directory (safetensors) with its directions file.

The full state dict is gathered from the FSDP shards; rank 0 loads a fresh copy of the base
model from its spec, loads the trained weights into it (merging LoRA adapters into the base
weights), and calls ``save_pretrained``, which handles tied embeddings. The result loads with
``AutoModelForCausalLM.from_pretrained(dir)`` and ``fastprocon``'s ``load_model(dir)``.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from fastprocon.models.load import load_model
from fastprocon.train.config import Config
from fastprocon.train.prepare import apply_lora

DIRECTIONS_FILE = "directions.safetensors"


def clean_export_staging(out_dir: Path) -> list[str]:
    """Remove the staging directories (``.<name>.*`` beside ``out_dir``) that an export killed
    before its rename left behind; returns their names. Run under the run's lock (no export runs)."""
    out_dir = Path(out_dir)
    removed = []
    for staging in sorted(out_dir.parent.glob(f".{out_dir.name}.*")):
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging.name)
    return removed


def export_model(cfg: Config, full_state_dict: dict, out_dir: Path, directions_path: Path | None) -> Path:
    """Write ``out_dir`` (replacing it atomically): config, safetensors weights, tokenizer and,
    when given, a copy of the directions file. Call on rank 0 with the gathered state dict."""
    loaded = load_model(cfg.model.spec, dtype=torch.float32, device="cpu")
    model = apply_lora(cfg, loaded.model) if cfg.model.lora else loaded.model
    missing, unexpected = model.load_state_dict(full_state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"trained weights do not fit a fresh {cfg.model.spec!r} model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if cfg.model.lora:
        model = model.merge_and_unload()
    if hasattr(model.config, "quantization_config"):   # a GGUF-converted config: the export is plain fp32
        del model.config.quantization_config
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staging.chmod(0o755)   # mkdtemp makes it private
        model.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
        if directions_path is not None:
            shutil.copyfile(directions_path, staging / DIRECTIONS_FILE)
        for file in staging.iterdir():   # some writers create private temp files
            file.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
