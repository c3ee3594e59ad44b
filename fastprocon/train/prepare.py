"""What a run needs before its first step: the model, the tokenized data, the refusal directions
and the reference projections z0, each loaded and checked, or made when absent (and, for
``norm = "band"``, the band's per-layer widths from z0's spread).

The model is the training model itself (LoRA, activation checkpointing and FSDP2 applied when
it was built, see :func:`wrap_for_training`), run as the initial model (:func:`initial_model`:
eval mode, adapters off, no gradients) by every process together: directions are computed by
all ranks and written by rank 0; the reference cache is built by all ranks together.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import fastprocon.distributed as D
from fastprocon.data.cache import TokenizedDataset, load_training_set
from fastprocon.data.examples import resolve_data_path
from fastprocon.distributed.collectives import broadcast_object
from fastprocon.distributed.process import DistContext
from fastprocon.models.layers import attention_projections, decoder_layers
from fastprocon.models.load import LoadedModel
from fastprocon.procon.reference import ReferenceCache
from fastprocon.procon.setup import band_widths, constrained_layers, directions_for, initial_model
from fastprocon.refusal.directions import DirectionSet, directions_hash
from fastprocon.train.config import Config


@dataclass
class TrainingData:
    examples: TokenizedDataset   # memory-mapped; examples[i] materialises one sample
    hash: str
    n_primary: int          # examples from data.train
    n_safety: int           # safety examples mixed in
    n_truncated: int        # examples cut at data.max_length


@dataclass
class ProConInputs:
    directions: DirectionSet
    directions_path: Path
    layers: list[int]                     # constrained layers, ascending (rows of z0)
    reference: ReferenceCache | None      # None when z0 comes from the model with adapters off
    reference_path: Path | None
    widths: torch.Tensor | None = None    # norm = "band": per-layer half-widths [len(layers)] fp32 (CPU)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) if cfg.train.run_dir else Path("runs") / cfg.train.name


def load_training_data(cfg: Config, tokenizer) -> TrainingData:
    """data.train (+ data.safety_samples from data.safety, mixed by the seed), tokenized through
    the on-disk cache (fastprocon/data/cache.py): memory-mapped, built once by rank 0."""
    d = cfg.data
    try:
        examples = load_training_set(resolve_data_path(d.train), tokenizer, d.max_length,
                                     skip_bad_rows=d.skip_bad_rows, drop_overlong_prompts=d.drop_overlong_prompts,
                                     safety=resolve_data_path(d.safety) if d.safety_samples > 0 else None,
                                     safety_samples=d.safety_samples, seed=cfg.train.seed)
    except ValueError as err:
        if str(err).startswith("safety_samples = "):
            raise ValueError(f"config data.{err}") from None
        raise
    return TrainingData(examples, examples.hash, examples.info["n_primary"], d.safety_samples,
                        examples.info["n_truncated"])


def prepare_procon(cfg: Config, loaded: LoadedModel, data: TrainingData, run_dir: Path, ctx: DistContext,
                   say: Callable[[str], None]) -> ProConInputs:
    """Directions and reference cache for this model and data: loaded and checked when their
    files exist, else made (and saved) first; only the default paths in ``run_dir`` are made, an
    explicit procon.directions / procon.reference_cache must exist."""
    p = cfg.procon
    # only the default paths in the run directory are made when absent: an explicit path that does
    # not exist is most likely a typo, and making new directions there would hide it
    for key, value, what in (("directions", p.directions, "directions"),
                             ("reference_cache", p.reference_cache if p.reference == "cache" else "", "z0")):
        if value and not Path(value).exists():
            raise FileNotFoundError(f"procon.{key} = {value} does not exist; leave it empty to make {what} in the "
                                    "run directory")
    directions_path = Path(p.directions) if p.directions else run_dir / "directions.safetensors"
    directions = directions_for(loaded, p, directions_path, progress=ctx.is_main, say=say)
    layers = constrained_layers(p.layers, directions)

    if p.reference == "adapters_off":
        return ProConInputs(directions, directions_path, layers, None, None)
    reference_path = Path(p.reference_cache) if p.reference_cache else run_dir / "reference.safetensors"
    if broadcast_object(not reference_path.exists()):
        say(f"recording reference projections z0 -> {reference_path}")
        with initial_model(loaded.model):
            ReferenceCache.build(loaded, directions, data.examples, layers, cfg.data.max_length, reference_path,
                                 storage_dtype=p.reference_dtype, progress=ctx.is_main)
    else:
        say(f"using reference projections {reference_path}")
    reference = ReferenceCache.load(reference_path, model_fingerprint=loaded.fingerprint,
                                    directions_hash=directions_hash(directions), dataset_hash=data.hash,
                                    max_length=cfg.data.max_length, layers=layers, storage_dtype=p.reference_dtype)
    widths = None
    if p.norm == "band":   # from the whole cache: the same widths on every process, whatever the world size
        widths = band_widths(reference, layers, p.band_fraction)
        say(f"band half-widths ({p.band_fraction:g} x the std of z0 per layer): {widths.min():.4g} to "
            f"{widths.max():.4g}")
    return ProConInputs(directions, directions_path, layers, reference, reference_path, widths)


def wrap_for_training(cfg: Config, model: torch.nn.Module, device: torch.device, mesh=None) -> torch.nn.Module:
    """LoRA (when model.lora), activation checkpointing (when asked), compiled layers (model.compile),
    FSDP2 (over ``mesh``: None = all processes, or HSDP's 2-D mesh): applied to the meta-device model
    before its weights are loaded (see models.load_model)."""
    model = apply_lora(cfg, model) if cfg.model.lora else model
    layers = decoder_layers(model)
    if cfg.model.activation_checkpointing:
        D.apply_activation_checkpointing(layers)
    if D.use_compile(cfg.model.compile, device):
        D.compile_decoder_layers(layers)
    D.shard_model(model, layers, D.mixed_precision_dtype(cfg.model.mixed_precision, device), mesh)
    return model


def apply_lora(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters on the attention's projections (q/k/v/o, or the family's fused
    ones: models.layers.attention_projections; base weights frozen). Needs ``peft``.

    On a meta-device model the adapters are placeholders: loading.load_weights gives them
    PEFT's default init from cfg.train.seed (the same values whatever the process count)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ModuleNotFoundError("config model.lora = true needs the peft package: pip install peft") from err
    m = cfg.model
    config = LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, bias="none",
                        target_modules=attention_projections(model), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):   # on a real model: the same adapters on every rank
        torch.manual_seed(cfg.train.seed)
        return get_peft_model(model, config)
