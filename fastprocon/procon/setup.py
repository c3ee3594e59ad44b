"""Setting ProCon up on a model: its refusal directions (loaded and checked, or made on the initial
model), the constrained layers, the initial model itself (for z0) and the band's per-layer widths. One routine for
``fastprocon train`` (train/prepare.py) and for the integrations (integrations/procon.py)."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable

import torch

from fastprocon.data.examples import load_instructions, resolve_data_path
from fastprocon.distributed.collectives import on_main
from fastprocon.models.load import LoadedModel
from fastprocon.procon.config import ProConConfig
from fastprocon.procon.reference import ReferenceCache
from fastprocon.refusal.directions import DirectionSet, extract_directions, load_directions_for, save_directions


@contextlib.contextmanager
def initial_model(model: torch.nn.Module):
    """``model`` as the initial model: eval mode, LoRA adapters off (they start at zero anyway),
    no gradients; the training mode is restored afterwards. On GPU with bf16 mixed precision the
    forward computes in bf16, as the training forward does."""
    was_training = model.training
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    model.eval()
    try:
        with torch.no_grad(), adapters_off:
            yield model
    finally:
        model.train(was_training)
        if hasattr(model, "reshard"):   # FSDP2 keeps the root unsharded after a forward: the optimizer
            model.reshard()             # and checkpoints must see the sharded parameters


def constrained_layers(layers: str | list[int], directions: DirectionSet) -> list[int]:
    """procon.layers (``"all"``: every layer with a direction, or layer indices) -> sorted layers,
    each checked to have a direction."""
    if isinstance(layers, str):
        if layers.strip() != "all":
            raise ValueError(f"procon.layers must be 'all' or a list of layer indices, got {layers!r}")
        return directions.defined_layers
    layers = sorted({int(l) for l in layers})
    if not layers:
        raise ValueError("no layers to constrain")
    if layers[0] < 0 or layers[-1] >= directions.num_layers:
        raise ValueError(f"layers {layers} out of range: the directions cover layers 0..{directions.num_layers - 1}")
    undefined = [l for l in layers if l not in set(directions.defined_layers)]
    if undefined:
        raise ValueError(f"layer(s) {undefined} have no refusal direction (zero mean difference); "
                         f"layers with one: {directions.defined_layers}")
    return layers


def band_widths(reference: ReferenceCache, layers: list[int], fraction: float) -> torch.Tensor:
    """Per-layer half-widths of ``norm="band"``: ``fraction`` times the standard deviation of z0
    over every response token of the cache at that layer ([len(layers)] fp32, CPU). Computed from
    the whole cache (all shards, a fixed order), so every process gets the same bits whatever the
    world size. A layer whose z0 does not vary is an error: its band would have width 0."""
    if list(reference.layers) != list(layers):
        raise ValueError(f"reference cache {reference.path} covers layers {reference.layers}, not the constrained "
                         f"layers {layers}")
    std = reference.layer_std()
    flat = [layer for layer, s in zip(layers, std) if not (s > 0 and math.isfinite(s))]
    if flat:
        raise ValueError(f"reference cache {reference.path}: z0 has no spread (std 0 or not finite) at layer(s) "
                         f"{flat}, so norm = 'band' has no width there; constrain other layers or use another norm")
    return torch.from_numpy(fraction * std).float()


def directions_for(loaded: LoadedModel, p: ProConConfig, path: Path | None, *, progress: bool = False,
                   say: Callable[[str], None] = lambda message: None,
                   initial: Callable[[], contextlib.AbstractContextManager] | None = None) -> DirectionSet:
    """The refusal directions of ``loaded``: read from ``path`` (checked against the model) when
    the file exists, else extracted from ``p.harmful`` / ``p.harmless`` on the initial model and
    saved to ``path`` (by rank 0; ``path`` None keeps them in memory). Rank 0 decides whether the
    file exists, for every process (a rank that looked later could see rank 0's new file); every
    process runs the extraction's forwards (those of a sharded model are collective).
    ``initial``: the context that makes the model the initial one (default :func:`initial_model`)."""
    if path is not None and on_main(path.exists):
        say(f"using refusal directions {path}")
        return load_directions_for(loaded, path)
    if path is not None:
        say(f"making refusal directions -> {path}")
    harmful = load_instructions(resolve_data_path(p.harmful))
    harmless = load_instructions(resolve_data_path(p.harmless))
    with (initial or (lambda: initial_model(loaded.model)))():
        ds = extract_directions(loaded, harmful, harmless, p.direction_batch_size,
                                sources={"harmful": p.harmful, "harmless": p.harmless}, progress=progress)
    if path is None:
        return ds
    on_main(lambda: save_directions(ds, path))   # the other ranks wait for it in on_main's broadcast
    return load_directions_for(loaded, path)
