"""How far each fine-tuned model's projections moved from the aligned model's: the quantity the
ProCon loss penalises, measured after training on the same GSM8K training rows.

For every response token j and constrained layer l: z = r_l . x_l(j) under the trained weights,
z0 the same under the aligned weights, with the aligned model's directions r. Reported as the
mean of |z - z0| per (token, layer) and per layer (the ProCon "sample" penalty divided by the
number of response tokens and layers).
"""
from __future__ import annotations

import torch

from fastprocon.models.load import LoadedModel
from fastprocon.procon.reference import compute_projections
from fastprocon.refusal.directions import DirectionSet


def projections(loaded: LoadedModel, directions: DirectionSet, tokenized: list, batch_size: int = 8) -> dict:
    """id -> [n_layers, n_response] fp32 projections on ``directions.defined_layers``."""
    ids, pieces = compute_projections(loaded, directions, tokenized, directions.defined_layers, batch_size)
    return dict(zip(ids, pieces))


def deviation(z: dict, z0: dict, layers: list[int]) -> dict:
    """Mean |z - z0| over all (token, layer) pairs and per layer -> {"mean_abs", "per_layer": [L] or None}."""
    if z.keys() != z0.keys():
        raise ValueError(f"projection sets differ: {len(z.keys() ^ z0.keys())} sample ids in only one of them")
    diff = torch.cat([(z[k] - z0[k]).abs() for k in sorted(z0)], dim=1).double()   # [n_layers, n_tokens]
    per_layer = diff.mean(dim=1).tolist()
    full = [None] * (max(layers) + 1)
    for l, v in zip(layers, per_layer):
        full[l] = v
    return {"mean_abs": diff.mean().item(), "per_layer": full, "n_tokens": diff.shape[1]}
