"""Triton kernels for the ProCon projection penalty.

For N hidden states H [N, D], a unit direction r [D], reference projections z0 [N] and
per-token weights w [N]:

    z_i   = H_i . r                              (accumulated in fp32; fp64 for fp64 input)
    loss  = sum_i w_i * psi(z_i - z0_i)          (unscaled; the caller multiplies by `scale`)
    psi   = |d| (l1), d^2 (l2sq), Huber with threshold delta (huber), or max(|d| - delta, 0)
            (band: psi' is exactly 0 inside |d| <= delta)
    c_i   = w_i * psi'(z_i - z0_i)               (unscaled gradient coefficient)
    dL/dH = g * c (outer) r                      (g = upstream gradient * scale, a 0-d tensor)
    hc    = sum_i c_i H_i                        (only when the direction needs a gradient:
                                                  dL/dr = g * hc, before the normalisation's part)

The forward reads every row of H once and writes z, c and one loss partial per program;
`_sum_partials_kernel` then adds the partials in a fixed order, so the loss is bitwise
reproducible (no atomics); hc, when asked for, is reduced the same way from one [D] partial
per program. The backward writes g * c (outer) r (plus an optional incoming
gradient, for the injection form) into a new buffer in H's dtype. Nothing N x D is saved.

Block sizes come from a fixed heuristic rather than autotuning: a fixed configuration keeps
the reduction order, hence the bits, identical from run to run. Under TRITON_INTERPRET=1
(CPU tests) each program costs milliseconds, so blocks are made large there.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# psi selectors (constexpr); the Python layer maps "l1"/"l2sq"/"huber"/"band" to these.
NORM_L1, NORM_L2SQ, NORM_HUBER, NORM_BAND = 0, 1, 2, 3


@triton.jit
def _procon_fwd_kernel(
    h_ptr, stride_h,           # [N, D], row stride in elements, last dim contiguous
    r_ptr,                     # [D] unit direction, accumulation dtype
    z0_ptr, w_ptr,             # [N] each, any float (w may be bool); ignored unless HAS_Z0 / HAS_W
    z_ptr, coef_ptr,           # [N] outputs, accumulation dtype
    partial_ptr,               # [num_programs] per-program loss partials
    hc_ptr,                    # [num_programs, D] per-program partials of sum_i c_i H_i (NEED_DIR_GRAD)
    N, D, delta,               # delta: Huber's threshold or the band's half-width (unless HAS_DELTA_PTR)
    delta_ptr,                 # 0-d tensor holding delta instead (HAS_DELTA_PTR): no host sync for the caller
    NORM: tl.constexpr, HAS_DELTA_PTR: tl.constexpr, HAS_Z0: tl.constexpr, HAS_W: tl.constexpr, NEED_GRAD: tl.constexpr,
    NEED_DIR_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # int64 offsets: N * D may exceed 2**31 on large batches.
    row_off = rows.to(tl.int64) * stride_h
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        r = tl.load(r_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
        h = tl.load(h_ptr + row_off[:, None] + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += h.to(ACC_DTYPE) * r[None, :]   # upcast right after the load (bf16 math is unsafe)
    z = tl.sum(acc, axis=1)
    tl.store(z_ptr + rows, z, mask=row_mask)

    diff = z
    if HAS_Z0:
        diff = z - tl.load(z0_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
    w = tl.where(row_mask, 1.0, 0.0).to(ACC_DTYPE)
    if HAS_W:
        w = tl.load(w_ptr + rows, mask=row_mask, other=0).to(ACC_DTYPE)
    if HAS_DELTA_PTR:
        delta = tl.load(delta_ptr).to(ACC_DTYPE)
    absd = tl.abs(diff)
    sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(ACC_DTYPE)
    if NORM == 0:    # l1: |d|, subgradient sign(d) (0 at 0)
        psi = absd
        dpsi = sign
    elif NORM == 1:  # l2sq: d^2
        psi = diff * diff
        dpsi = 2.0 * diff
    elif NORM == 2:  # huber(delta): quadratic inside |d| <= delta, linear outside
        inside = absd <= delta
        psi = tl.where(inside, 0.5 * diff * diff, delta * (absd - 0.5 * delta))
        dpsi = tl.where(inside, diff, delta * sign)
    else:            # band(delta): 0 inside |d| <= delta (gradient exactly 0), |d| - delta outside
        outside = absd > delta
        psi = tl.where(outside, absd - delta, 0.0)
        dpsi = tl.where(outside, sign, 0.0)
    # a weight-0 row is excluded entirely: a NaN/inf H there must not give 0 * NaN (rows past N too)
    keep = w != 0
    tl.store(partial_ptr + pid, tl.sum(tl.where(keep, w * psi, 0.0), axis=0))
    c = tl.where(keep, w * dpsi, 0.0)
    if NEED_GRAD:
        tl.store(coef_ptr + rows, c, mask=row_mask)
    if NEED_DIR_GRAD:  # c is known only now: read the block's rows again (just read, so cache-hot)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            h = tl.load(h_ptr + row_off[:, None] + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            hc = tl.where(keep[:, None], h.to(ACC_DTYPE) * c[:, None], 0.0)
            tl.store(hc_ptr + pid.to(tl.int64) * D + cols, tl.sum(hc, axis=0), mask=col_mask)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, P, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """One program adds the P partials in a fixed order: the loss is bitwise reproducible."""
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < P, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _sum_rows_kernel(partial_ptr, out_ptr, P, D, ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """out[d] = sum_p partial[p, d], each column block by one program in a fixed order."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC_DTYPE)
    for p0 in range(0, P, BLOCK_P):
        rows = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        acc += tl.load(partial_ptr + rows[:, None] * D + cols[None, :],
                       mask=(rows < P)[:, None] & col_mask[None, :], other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=col_mask)


@triton.jit
def _round_fp32_to_bf16_bits(x):
    """Round-to-nearest-even of fp32 to bf16 precision, kept in fp32. The interpreter's fp32 ->
    bf16 cast truncates (GPUs round to nearest even); rounding first makes the cast exact."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _procon_bwd_kernel(
    coef_ptr, r_ptr, g_ptr,    # [N], [D], 0-d (upstream gradient times scale)
    gin_ptr, stride_gin,       # optional incoming gradient [N, D] (HAS_GIN), last dim contiguous
    out_ptr, stride_out,       # [N, D] result, H's dtype
    N, D,
    HAS_GIN: tl.constexpr, ROUND_BF16: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    g = tl.load(g_ptr).to(ACC_DTYPE)
    c = g * tl.load(coef_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
    r = tl.load(r_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    grad = c[:, None] * r[None, :]
    rows64 = rows.to(tl.int64)
    if HAS_GIN:
        gin = tl.load(gin_ptr + rows64[:, None] * stride_gin + cols[None, :], mask=mask, other=0.0)
        grad += gin.to(ACC_DTYPE)
    if ROUND_BF16:
        grad = _round_fp32_to_bf16_bits(grad)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
             grad.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch configuration


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for hidden states of `dtype`: fp64 for fp64, else fp32 (the kernels', the
    PyTorch path's and the unit direction's)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_ACC = {torch.float64: tl.float64, torch.float32: tl.float32}


def _acc_dtype(dtype: torch.dtype):
    """(torch, triton) accumulation dtypes for hidden states of `dtype` (see :func:`acc_dtype`)."""
    acc = acc_dtype(dtype)
    return acc, _TL_ACC[acc]


def _fwd_blocks(N: int, D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for the forward: 8K elements in flight per program (4K for
    fp64, whose accumulator takes twice the registers: 8K spills on sm_90)."""
    block_d = min(triton.next_power_of_2(D), 4096 if INTERPRET else 512)
    if INTERPRET:  # few, large programs: each interpreted program costs milliseconds
        return max(1, min(256, 65536 // block_d)), block_d, 4
    tile = 4096 if dtype == torch.float64 else 8192
    block_n = max(1, min(64, tile // block_d))
    return block_n, block_d, 4 if block_n * block_d <= 8192 else 8


def _bwd_blocks(N: int, D: int) -> tuple[int, int, int]:
    block_d = min(triton.next_power_of_2(D), 4096 if INTERPRET else 1024)
    if INTERPRET:
        return max(1, min(256, 65536 // block_d)), block_d, 4
    return max(1, min(64, 8192 // block_d)), block_d, 8


def _sum_rows_blocks(D: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_D) of the [programs, D] column sum: many column programs on a GPU."""
    if INTERPRET:
        block_d = min(triton.next_power_of_2(D), 4096)
        return max(1, min(64, 8192 // block_d)), block_d
    return 32, 128


def wrap(kernel):
    """`torch.library.wrap_triton(kernel)` when available, so the launches stay visible to
    torch.compile inside a `triton_op`. Interpreted kernels (TRITON_INTERPRET=1) are returned
    as they are: torch 2.13 does the same itself, torch 2.11 raises on them."""
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap_triton is None or INTERPRET else wrap_triton(kernel)


# wrapped once, here: not at every launch
_FWD, _SUM_PARTIALS, _SUM_ROWS, _BWD = map(wrap, (_procon_fwd_kernel, _sum_partials_kernel, _sum_rows_kernel,
                                                   _procon_bwd_kernel))


def projection_fwd(hidden: torch.Tensor, direction: torch.Tensor, reference: torch.Tensor | None,
                   weight: torch.Tensor | None, norm: int, delta: float, need_grad: bool,
                   need_dir_grad: bool = False, delta_tensor: torch.Tensor | None = None):
    """Launch the fused forward.

    hidden [N, D] (stride(1) == 1), direction [D] in the accumulation dtype (fp32, or fp64 for
    fp64 hidden), reference / weight [N] or None; delta_tensor, when given, is a 0-d float tensor
    on hidden's device used in place of delta. Returns (z [N], coef [N] or [0], loss [],
    hc [D] or [0]) in the accumulation dtype; the loss is unscaled; hc = sum_i coef_i H_i is
    computed only with need_dir_grad (through a [programs, D] temporary, freed on return).
    """
    N, D = hidden.shape
    acc_torch, acc_tl = _acc_dtype(hidden.dtype)
    block_n, block_d, warps = _fwd_blocks(N, D, hidden.dtype)
    programs = triton.cdiv(N, block_n)
    z = torch.empty(N, dtype=acc_torch, device=hidden.device)
    coef = torch.empty(N if need_grad else 0, dtype=acc_torch, device=hidden.device)
    partials = torch.empty(max(programs, 1), dtype=acc_torch, device=hidden.device)
    loss = torch.empty((), dtype=acc_torch, device=hidden.device)
    hc = torch.zeros(D if need_dir_grad else 0, dtype=acc_torch, device=hidden.device)
    hc_partials = torch.empty((programs, D) if need_dir_grad and N > 0 else 0, dtype=acc_torch,
                              device=hidden.device)
    if N == 0:
        partials.zero_()
    else:
        _FWD[(programs,)](
            hidden, hidden.stride(0), direction,
            reference if reference is not None else z, weight if weight is not None else z,
            z, coef, partials, hc_partials if need_dir_grad else z, N, D, float(delta),
            delta_tensor if delta_tensor is not None else z,
            NORM=norm, HAS_DELTA_PTR=delta_tensor is not None, HAS_Z0=reference is not None,
            HAS_W=weight is not None, NEED_GRAD=need_grad,
            NEED_DIR_GRAD=need_dir_grad, ACC_DTYPE=acc_tl, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
        )
    _SUM_PARTIALS[(1,)](partials, loss, partials.numel(), ACC_DTYPE=acc_tl, BLOCK=1024)
    if need_dir_grad and N > 0:
        block_p, block_d = _sum_rows_blocks(D)
        _SUM_ROWS[(triton.cdiv(D, block_d),)](
            hc_partials, hc, programs, D, ACC_DTYPE=acc_tl, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=4)
    return z, coef, loss, hc


def projection_bwd(coef: torch.Tensor, direction: torch.Tensor, grad_scale: torch.Tensor,
                   grad_in: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Launch the rank-one backward: returns grad_scale * coef (outer) direction (+ grad_in)
    as a new [N, D] tensor of `out_dtype`. grad_in, when given, is [N, D] with stride(1) == 1."""
    N, D = coef.numel(), direction.numel()
    _, acc_tl = _acc_dtype(out_dtype)
    out = torch.empty((N, D), dtype=out_dtype, device=coef.device)
    if N == 0:
        return out
    block_n, block_d, warps = _bwd_blocks(N, D)
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d))
    _BWD[grid](
        coef, direction, grad_scale,
        grad_in if grad_in is not None else out, grad_in.stride(0) if grad_in is not None else 0,
        out, out.stride(0), N, D,
        HAS_GIN=grad_in is not None, ROUND_BF16=INTERPRET and out_dtype == torch.bfloat16, ACC_DTYPE=acc_tl,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    return out
