"""Hooks at the inputs of decoder layers: read them, or steer them along a refusal direction.

The input of decoder layer l is the residual stream HF reports as ``hidden_states[l]``
("resid_pre"; index 0 is the embedding output). All hooks here are forward *pre*-hooks on
:func:`fastprocon.models.load.decoder_layers`, so they see exactly what the layer sees, work with
``model.generate`` (every position of the prompt and every generated token) and are removed
when their ``with`` block exits, even on an exception. Hooks run in the order they were
entered, so a reading hook entered after a steering hook sees the steered input.

The two standard tests of a direction (Arditi et al. 2024):

* :func:`activation_addition`  x <- x + coef * r_hat at the input of one layer;
* :func:`directional_ablation` x <- x - (x . r_hat) r_hat at the input of every layer.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch

from fastprocon.models.layers import decoder_layers
from fastprocon.penalty.ops import unit_direction

# fn(layer index, layer input [B, T, D]) -> replacement input, or None to leave it unchanged
LayerInputFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@contextmanager
def on_layer_inputs(model: torch.nn.Module, fn: LayerInputFn, layers: Iterable[int] | None = None,
                    keys: list | None = None) -> Iterator[None]:
    """Call ``fn(l, x)`` on the input ``x`` [B, T, D] of each decoder layer ``l`` in ``layers``.

    ``layers`` None means all of them. When ``fn`` returns a tensor, the layer gets it instead.
    ``keys``: what ``fn`` gets instead of ``l``, one per chosen layer (e.g. 0-d tensors: a
    torch.compile'd layer then traces one graph for all layers, not one per Python int).
    """
    blocks = decoder_layers(model)
    chosen = range(len(blocks)) if layers is None else [int(l) for l in layers]
    for l in chosen:
        if not 0 <= l < len(blocks):
            raise ValueError(f"layer {l} out of range: the model has {len(blocks)} decoder layers "
                             f"(0..{len(blocks) - 1})")

    def make_hook(key):
        def hook(module, args, kwargs):
            # transformers passes hidden_states positionally; accept the keyword form too
            x = args[0] if args else kwargs["hidden_states"]
            out = fn(key, x)
            if out is None:
                return None
            if args:
                return (out, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": out}
        return hook

    # on a torch.compile'd layer, inside the compiled region (the wrapped module's own hooks)
    keys = list(chosen) if keys is None else list(keys)
    handles = [getattr(blocks[l], "_orig_mod", blocks[l]).register_forward_pre_hook(make_hook(key), with_kwargs=True)
               for l, key in zip(chosen, keys)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _unit(direction: torch.Tensor) -> torch.Tensor:
    """fp32 unit vector(s) along the last dim (:func:`fastprocon.penalty.ops.unit_direction`); a
    zero or non-finite row is an error."""
    r = direction.detach().float()
    if not torch.isfinite(r).all() or (r == 0).all(dim=-1).any():
        raise ValueError("steering direction has a zero-length or non-finite row")
    return unit_direction(r, torch.float32)


@contextmanager
def activation_addition(model: torch.nn.Module, direction: torch.Tensor, layer: int, coef: float) -> Iterator[None]:
    """Add ``coef * r_hat`` to the input of decoder layer ``layer`` at every position.

    ``direction`` [D] (any float dtype; normalised to unit length here), so ``coef`` is in
    residual-stream units: Arditi's addition of the raw mean difference is
    ``coef = DirectionSet.norms[layer]``. A negative ``coef`` subtracts the direction.
    """
    if direction.dim() != 1:
        raise ValueError(f"activation_addition takes one direction [D], got shape {tuple(direction.shape)}")
    r = _unit(direction)
    cache: dict[tuple, torch.Tensor] = {}

    def add(l: int, x: torch.Tensor) -> torch.Tensor:
        _check_width(r, x)
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (coef * r).to(device=x.device, dtype=x.dtype)
        return x + cache[key]

    with on_layer_inputs(model, add, [layer]):
        yield


@contextmanager
def directional_ablation(model: torch.nn.Module, directions: torch.Tensor) -> Iterator[None]:
    """Remove the component along r_hat from the input of every decoder layer, at every position.

    ``directions`` [L, D] (one per layer) or [D] (the same direction at every layer, as in
    Arditi's ablation of one selected direction); all-zero rows (undefined layers) are skipped.
    The projection is computed in fp32.
    """
    n_layers = len(decoder_layers(model))
    if directions.dim() == 1:
        directions = directions.expand(n_layers, -1)
    if directions.dim() != 2 or directions.shape[0] != n_layers:
        raise ValueError(f"directional_ablation takes [D] or [L={n_layers}, D] directions, got shape "
                         f"{tuple(directions.shape)}")
    # all-zero rows (layers without a direction, see DirectionSet) are left alone
    directions = directions.detach().float().cpu()
    defined = (directions != 0).any(dim=-1).nonzero().flatten().tolist()
    if not defined:
        raise ValueError("directional_ablation got only all-zero directions")
    r_all = torch.zeros_like(directions)
    r_all[defined] = _unit(directions[defined])
    moved: dict[torch.device, torch.Tensor] = {}

    def ablate(l: int, x: torch.Tensor) -> torch.Tensor:
        _check_width(r_all, x)
        if x.device not in moved:
            moved[x.device] = r_all.to(x.device)
        r = moved[x.device][l]
        xf = x.float()
        return (xf - (xf @ r).unsqueeze(-1) * r).to(x.dtype)

    with on_layer_inputs(model, ablate, defined):
        yield


def _check_width(r: torch.Tensor, x: torch.Tensor) -> None:
    if r.shape[-1] != x.shape[-1]:
        raise ValueError(f"direction has length {r.shape[-1]} but the layer input has hidden size {x.shape[-1]}")
