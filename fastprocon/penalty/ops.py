"""The three implementations of the ProCon projection penalty, as torch custom ops.

- ``triton``: the fused kernels of ``fastprocon.kernels.procon_projection`` (CUDA; the Triton
  interpreter on CPU in tests), registered with ``torch.library.triton_op`` so torch.compile
  sees the kernels themselves.
- ``torch``: the same fused rank-one math in plain PyTorch, chunked over rows so it never holds
  an fp32 copy of a half-precision H. The CPU runtime path.
- ``reference`` (``procon_penalty_ref``): the naive unfused autograd version; the benchmarks'
  baseline and the tests' oracle (run in float64).

Every fused op takes H [..., D] with a contiguous last dim, as the N = prod(...) rows of [N, D]
(a view when the strides allow: a caller need not flatten it, which would cost an operator).
``delta`` (Huber's threshold, the band's half-width) is a float, or a 0-d tensor on H's device
(``delta_tensor``, which then wins): a per-call width that costs no host sync and, under
torch.compile, no graph per value. Forward ops return (z [N], coef [N] or [0], loss [], hc [D]
or [0]) in the accumulation dtype (fp32; fp64 for fp64 H), loss unscaled, hc = sum_i coef_i H_i
(only with need_dir_grad: the direction's gradient); backward ops return grad_scale * coef
(outer) r (+ grad_in) as a new tensor of grad_in's shape ([N, D] without grad_in).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastprocon.kernels import procon_projection as kernels

NORMS = {"l1": kernels.NORM_L1, "l2sq": kernels.NORM_L2SQ, "huber": kernels.NORM_HUBER, "band": kernels.NORM_BAND}

# Rows per chunk of the torch path are chosen so a chunk's fp32 copy stays near 4 MiB.
_CHUNK_ELEMENTS = 1 << 20


# Accumulation dtype for hidden states of `dtype`: fp64 for fp64, else fp32 (defined with the kernels).
acc_dtype = kernels.acc_dtype


def unit_direction(direction: Tensor, dtype: torch.dtype) -> Tensor:
    """direction / |direction| in acc_dtype(dtype), for any finite non-zero direction [D] (or
    each row of [..., D] on its own).

    Divided by (about) its largest |entry| first (so the sum of squares lies in [1, D]: no overflow for
    entries like 1e20, no underflow for 1e-30), in the wider of direction's dtype and the
    accumulation dtype (a fp64 direction of 1e300 is scaled before it is cast to fp32).
    Differentiable: autograd gives dL/dr = (I - r_hat r_hat^T) dL/dr_hat / |r| (the max is a
    constant there, since r_hat does not depend on it). A zero row gives NaN: callers that
    allow one check for it.
    """
    acc = acc_dtype(dtype)
    d = direction.to(torch.promote_types(direction.dtype, acc))
    # A power of two near the max: the division is exact. Divided by the norm (not times rsqrt):
    # autograd's tangent projection then cancels exactly where it must (D = 1 gives 0).
    _, exponent = torch.frexp(d.detach().abs().amax(dim=-1, keepdim=True))
    d = d / torch.ldexp(torch.ones_like(exponent, dtype=d.dtype), exponent - 1)
    return (d / torch.linalg.vector_norm(d, dim=-1, keepdim=True)).to(acc)


def psi_and_grad(diff: Tensor, norm: int, delta: float | Tensor) -> tuple[Tensor, Tensor]:
    """psi(diff) and psi'(diff) elementwise, for the norm codes of ``NORMS`` (delta: a float or a
    0-d tensor, cast to diff's dtype)."""
    if norm == kernels.NORM_L1:
        return diff.abs(), diff.sign()
    if norm == kernels.NORM_L2SQ:
        return diff * diff, 2.0 * diff
    if isinstance(delta, Tensor):
        delta = delta.to(diff.dtype)
    if norm == kernels.NORM_BAND:   # max(|d| - delta, 0): psi' is exactly 0 inside the band
        outside = diff.abs() > delta
        zero = torch.zeros((), dtype=diff.dtype, device=diff.device)
        return torch.where(outside, diff.abs() - delta, zero), torch.where(outside, diff.sign(), zero)
    inside = diff.abs() <= delta
    psi = torch.where(inside, 0.5 * diff * diff, delta * (diff.abs() - 0.5 * delta))
    return psi, torch.where(inside, diff, delta * diff.sign())


def weighted_psi(z: Tensor, reference: Optional[Tensor], weight: Optional[Tensor], norm: int,
                 delta: float | Tensor) -> tuple[Tensor, Tensor]:
    """(w * psi(z - z0), w * psi'(z - z0)) per row, in z's dtype; None means z0 = 0, w = 1."""
    diff = z - reference.to(z.dtype) if reference is not None else z
    psi, dpsi = psi_and_grad(diff, norm, delta)
    if weight is not None:   # a weight-0 row is excluded entirely: not 0 * psi(NaN) = NaN
        w = weight.to(z.dtype)
        keep = w != 0
        psi, dpsi = torch.where(keep, psi * w, 0), torch.where(keep, dpsi * w, 0)
    return psi, dpsi


def _fwd_fake(hidden: Tensor, direction: Tensor, reference: Optional[Tensor], weight: Optional[Tensor],
              norm: int, delta: float, delta_tensor: Optional[Tensor], need_grad: bool,
              need_dir_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d, acc = hidden.shape[-1], acc_dtype(hidden.dtype)
    n = hidden.numel() // d
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n if need_grad else 0, dtype=acc),
            hidden.new_empty((), dtype=acc), hidden.new_empty(d if need_dir_grad else 0, dtype=acc))


def _as_rows(t: Tensor) -> Tensor:
    """[..., D] as [N, D] (a view when the strides allow)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _bwd_fake(coef: Tensor, direction: Tensor, grad_scale: Tensor, grad_in: Optional[Tensor],
              out_dtype: torch.dtype) -> Tensor:
    shape = grad_in.shape if grad_in is not None else (coef.shape[0], direction.shape[0])
    return coef.new_empty(shape, dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# triton backend


@torch.library.triton_op("fastprocon::projection_fwd_triton", mutates_args=())
def projection_fwd_triton(hidden: Tensor, direction: Tensor, reference: Optional[Tensor],
                          weight: Optional[Tensor], norm: int, delta: float, delta_tensor: Optional[Tensor],
                          need_grad: bool, need_dir_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels.projection_fwd(_as_rows(hidden), direction, reference, weight, norm, delta, need_grad,
                                  need_dir_grad, delta_tensor)


@torch.library.triton_op("fastprocon::projection_bwd_triton", mutates_args=())
def projection_bwd_triton(coef: Tensor, direction: Tensor, grad_scale: Tensor,
                          grad_in: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    if grad_in is None:
        return kernels.projection_bwd(coef, direction, grad_scale, None, out_dtype)
    return kernels.projection_bwd(coef, direction, grad_scale, _as_rows(grad_in), out_dtype).view(grad_in.shape)


# ---------------------------------------------------------------------------------------------
# torch backend: the same fused math, chunked


def _row_chunks(n: int, d: int, dtype: torch.dtype):
    """Row slices to process at once; the whole range when no dtype conversion is needed."""
    if dtype == acc_dtype(dtype):
        return [slice(0, n)]
    step = max(1, _CHUNK_ELEMENTS // max(d, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


@torch.library.custom_op("fastprocon::projection_fwd_torch", mutates_args=())
def projection_fwd_torch(hidden: Tensor, direction: Tensor, reference: Optional[Tensor],
                         weight: Optional[Tensor], norm: int, delta: float, delta_tensor: Optional[Tensor],
                         need_grad: bool, need_dir_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    hidden = _as_rows(hidden)
    n, d = hidden.shape
    width = delta if delta_tensor is None else delta_tensor
    acc = acc_dtype(hidden.dtype)
    z = torch.empty(n, dtype=acc, device=hidden.device)
    hc = torch.zeros(d if need_dir_grad else 0, dtype=acc, device=hidden.device)
    for rows in _row_chunks(n, d, hidden.dtype):
        h = hidden[rows].to(acc)
        torch.mv(h, direction, out=z[rows])
        if need_dir_grad:  # while the chunk's upcast copy is at hand: one pass over H
            ref_rows = reference[rows] if reference is not None else None
            w_rows = weight[rows] if weight is not None else None
            if w_rows is not None:   # weight-0 rows out (their coefficient is 0, but 0 * NaN is NaN)
                h = h.masked_fill((w_rows == 0)[:, None], 0)
            hc.addmv_(h.t(), weighted_psi(z[rows], ref_rows, w_rows, norm, width)[1])
    psi, dpsi = weighted_psi(z, reference, weight, norm, width)
    coef = dpsi if need_grad else z.new_empty(0)
    return z, coef, psi.sum(), hc


@torch.library.custom_op("fastprocon::projection_bwd_torch", mutates_args=())
def projection_bwd_torch(coef: Tensor, direction: Tensor, grad_scale: Tensor,
                         grad_in: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    if grad_in is not None and grad_in.dim() != 2:
        return _bwd_torch_rows(coef, direction, grad_scale, _as_rows(grad_in), out_dtype).view(grad_in.shape)
    return _bwd_torch_rows(coef, direction, grad_scale, grad_in, out_dtype)


def _bwd_torch_rows(coef: Tensor, direction: Tensor, grad_scale: Tensor, grad_in: Optional[Tensor],
                    out_dtype: torch.dtype) -> Tensor:
    n, d = coef.shape[0], direction.shape[0]
    c = coef * grad_scale
    if out_dtype == acc_dtype(out_dtype):  # no conversion: one op writes the result
        return torch.outer(c, direction) if grad_in is None else torch.addr(grad_in.to(out_dtype), c, direction)
    out = torch.empty((n, d), dtype=out_dtype, device=coef.device)
    for rows in _row_chunks(n, d, out_dtype):
        part = torch.outer(c[rows], direction) if grad_in is None else \
            torch.addr(grad_in[rows].to(c.dtype), c[rows], direction)
        out[rows] = part
    return out


for _op in (projection_fwd_triton, projection_fwd_torch):
    _op.register_fake(_fwd_fake)
for _op in (projection_bwd_triton, projection_bwd_torch):
    _op.register_fake(_bwd_fake)

FORWARD = {"triton": projection_fwd_triton, "torch": projection_fwd_torch}
BACKWARD = {"triton": projection_bwd_triton, "torch": projection_bwd_torch}


# ---------------------------------------------------------------------------------------------
# reference: naive, unfused, autograd


def procon_penalty_ref(hidden: Tensor, direction: Tensor, reference: Optional[Tensor] = None,
                       weight: Optional[Tensor] = None, *, norm: str = "l1", delta: float | Tensor = 1.0,
                       scale: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """The obviously-right version: upcast H, matvec, psi, weighted sum; autograd does the rest.

    hidden [..., D] any float dtype (computed in fp32, or fp64 for fp64 input); direction [D]
    (normalised here, overflow-safe); reference / weight of hidden's leading shape; delta a float
    or a 0-d tensor. Returns (loss [], z [...]).
    """
    acc = acc_dtype(hidden.dtype)
    h = hidden.to(acc)
    r = unit_direction(direction, hidden.dtype)
    z = h @ r
    z_used = z
    if weight is not None:   # a weight-0 row with a non-finite z is excluded entirely (not 0 * NaN)
        excluded = (weight == 0) & ~torch.isfinite(z.detach())
        # the direction's gradient H^T dL/dz would meet the NaN rows again: it gets them zeroed in H
        z_used = h.masked_fill(excluded[..., None], 0) @ r if r.requires_grad else torch.where(excluded, 0, z)
    diff = z_used - reference.to(acc) if reference is not None else z_used
    psi, _ = psi_and_grad(diff, NORMS[norm], delta)
    if weight is not None:
        psi = psi * weight.to(acc)
    return scale * psi.sum(), z
