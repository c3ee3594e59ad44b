"""The ProCon projection penalty: Triton kernels (top-level kernels/, installed as fastprocon.kernels)
-> custom ops per backend and the unfused reference (ops.py) -> checks, autograd Functions and the
public functions (functional.py)."""
from fastprocon.penalty.functional import BACKENDS, ProConPenalty, anchor_projection, procon_penalty
from fastprocon.penalty.ops import NORMS, procon_penalty_ref

__all__ = ["procon_penalty", "anchor_projection", "ProConPenalty", "procon_penalty_ref", "BACKENDS", "NORMS"]
