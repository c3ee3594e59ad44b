"""Public ProCon penalty API: input checks, autograd Functions, functional and module forms.

Two forms of the same penalty, loss = scale * sum_i w_i * psi(h_i . r_hat - z0_i):

- ``procon_penalty``: returns the loss (differentiable in ``hidden``), for users who add it to
  their own loss.
- ``anchor_projection``: returns ``hidden`` unchanged plus the detached penalty value; its
  backward adds scale * c (outer) r_hat to the incoming gradient in one fused pass, so a model's
  usual ``loss.backward()`` carries the constraint without any N x D temporary.

The direction need not be unit length: it is normalised on every call (overflow-safe, see
``ops.unit_direction``), so a raw difference-in-means vector works as is. Every argument that
requires grad gets its exact gradient; only [N] and [D] vectors are saved for backward.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import Tensor

from fastprocon.penalty import ops

BACKENDS = ("auto", "triton", "torch", "reference")
Scale = Union[float, int, Tensor]
Delta = Union[float, int, Tensor]


# ---------------------------------------------------------------------------------------------
# input checks (metadata only, except the optional direction value check)


def _check_float(name: str, t: Tensor, allow_bool: bool = False) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or not (t.is_floating_point() or (allow_bool and t.dtype == torch.bool)):
        kinds = "a floating-point or bool" if allow_bool else "a floating-point"
        raise TypeError(f"{name} must be {kinds} tensor, got dtype {t.dtype}")


def _check_inputs(hidden: Tensor, direction: Tensor, reference: Optional[Tensor], weight: Optional[Tensor],
                  norm: str, delta: Delta, scale: Scale, backend: str, validate: bool) -> None:
    _check_float("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, D] or [B, T, D], got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden has no features: its last dim D is 0 (shape {tuple(hidden.shape)})")
    _check_float("direction", direction)
    D = hidden.shape[-1]
    if direction.dim() != 1 or direction.shape[0] != D:
        raise ValueError(f"direction must have shape [{D}] to match hidden {tuple(hidden.shape)}, "
                         f"got {tuple(direction.shape)}")
    lead = tuple(hidden.shape[:-1])
    for name, t in (("reference", reference), ("weight", weight)):
        if t is None:
            continue
        _check_float(name, t, allow_bool=name == "weight")
        if tuple(t.shape) != lead:
            raise ValueError(f"{name} must have shape {list(lead)} (hidden's leading dims, hidden is "
                             f"{tuple(hidden.shape)}), got {tuple(t.shape)}")
    for name, t in (("direction", direction), ("reference", reference), ("weight", weight), ("scale", scale),
                    ("delta", delta)):
        if isinstance(t, Tensor) and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    check_options(norm, delta, backend)
    if isinstance(scale, Tensor):
        _check_float("scale", scale)
        if scale.dim() != 0:
            raise ValueError(f"scale must be a Python number or a 0-d tensor, got shape {tuple(scale.shape)}")
    elif not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number or a 0-d tensor, got {type(scale).__name__}")
    if validate and not torch.compiler.is_compiling():  # value checks need a host sync on GPU
        _check_direction_values(direction)
        _check_delta_value(norm, delta)


def check_options(norm: str, delta: Delta, backend: str) -> None:
    if norm not in ops.NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {sorted(ops.NORMS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if isinstance(delta, Tensor):   # metadata only; its value is checked by _check_delta_value
        _check_float("delta", delta)
        if delta.dim() != 0:
            raise ValueError(f"delta must be a Python number or a 0-d tensor, got shape {tuple(delta.shape)}")
        if delta.requires_grad:
            raise ValueError("delta must not require grad: the penalty has no gradient in its width")
        return
    if not (isinstance(delta, (int, float)) and delta >= 0 and delta < float("inf")):
        raise ValueError(f"delta must be a finite number >= 0, got {delta!r}")
    if norm == "huber" and delta == 0:   # Huber with delta 0 is identically zero: no constraint at all
        raise ValueError("delta must be > 0 for norm='huber'")


def _check_delta_value(norm: str, delta: Delta) -> None:
    """The value checks of a tensor delta (a host sync on GPU), as _check_options does for a float."""
    if isinstance(delta, Tensor):
        value = float(delta)
        if not (value >= 0 and value < float("inf")) or (norm == "huber" and value == 0):
            raise ValueError(f"delta must be a finite number >= 0 (> 0 for norm='huber'), got tensor({value!r})")


def _check_direction_values(direction: Tensor) -> None:
    if not bool(torch.isfinite(direction).all()):
        raise ValueError("direction has non-finite values")
    if not bool((direction != 0).any()):
        raise ValueError("direction is all zeros: it has no direction to project on")


def resolve_backend(backend: str, hidden: Tensor) -> str:
    """"auto" -> "triton" for CUDA tensors, "torch" otherwise; checks that "triton" can run."""
    if backend == "auto":
        return "triton" if hidden.is_cuda else "torch"
    if backend == "triton" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (hidden is on {hidden.device}); "
                         "use backend='torch' on CPU, or set TRITON_INTERPRET=1 before importing fastprocon")
    return backend


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1)


def excluding_weight_zero(reference: Optional[Tensor], weight: Optional[Tensor]) -> Optional[Tensor]:
    """z0 with 0 where the weight is 0 and z0 is not finite: such a token is excluded entirely (a
    NaN there would otherwise give 0 * NaN = NaN in the loss and the coefficients). A finite z0 is
    kept, so dL/dweight = g psi(z - z0) stays exact at weight-0 tokens."""
    if reference is None or weight is None:
        return reference
    return reference.masked_fill((weight == 0) & ~torch.isfinite(reference), 0)


# ---------------------------------------------------------------------------------------------
# autograd Functions over 2-D hidden states
#
# Both take r_hat (the unit direction, built by autograd-visible ops so that dL/dr_hat = g * hc
# becomes the exact dL/d(direction)), reference and weight as inputs, and return a gradient for
# each one that requires it, from [N] and [D] vectors only: dL/dz0 = -g c, dL/dw = g psi(z - z0),
# dL/dr_hat = g sum_i c_i H_i (computed in the forward pass, only when needed).


def _higher_order_error(name: str, why: str) -> RuntimeError:
    return RuntimeError(f"{name}: double backward (create_graph=True) is not supported {why}")


def _split_delta(delta: Delta) -> tuple[float, Optional[Tensor]]:
    """(float delta, 0-d tensor delta or None): the fused ops' two ways of taking it."""
    return (0.0, delta) if isinstance(delta, Tensor) else (float(delta), None)


def _unweighted_psi(z: Tensor, reference: Optional[Tensor], norm: int, delta: Delta) -> Tensor:
    return ops.psi_and_grad(z - reference.to(z.dtype) if reference is not None else z, norm, delta)[0]


def _create_graph() -> bool:
    """Whether this backward runs under create_graph=True. torch.compile traces backwards with
    grad mode on, and does not support double backward through compiled graphs (it raises)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _needs(ctx) -> tuple[bool, bool]:
    """(coefficients needed, H^T c needed): for hidden, reference or direction; for direction."""
    h, r, ref = ctx.needs_input_grad[:3]
    return h or r or ref, r


class ProConPenaltyFunction(torch.autograd.Function):
    """(loss, z): loss = sum w psi(H r_hat - z0) (unscaled), z = H r_hat; backward: the rank-one
    g c (outer) r_hat for H plus the vector gradients above. z is saved (an output, [N]) so that
    a create_graph backward is built from differentiable ops of z: double backward in H, z0, w
    and the upstream gradient is exact (psi'' = 0 for l1 and band, 2 for l2sq, 0/1 for huber)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, r: Tensor, reference, weight, norm: int, delta: Delta, backend: str):
        need_coef, need_hc = _needs(ctx)
        z, coef, loss, hc = ops.FORWARD[backend](hidden, r, reference, weight, norm, *_split_delta(delta),
                                                 need_coef, need_hc)
        ctx.save_for_backward(coef, r, z, reference, weight, hc)
        ctx.norm, ctx.delta, ctx.backend, ctx.dtype = norm, delta, backend, hidden.dtype
        ctx.set_materialize_grads(False)
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss: Optional[Tensor], grad_z: Optional[Tensor]):
        coef, r, z, reference, weight, hc = ctx.saved_tensors
        need_h, need_r, need_ref, need_w = ctx.needs_input_grad[:4]
        create_graph = _create_graph()
        if torch.compiler.is_compiling():
            grad_z = None  # dynamo passes zeros here; z is differentiated only by a double backward (not traced)
        if need_r and (create_graph or grad_z is not None):
            raise _higher_order_error("procon_penalty", "with a direction that requires grad: its second "
                                      "derivative needs H, which is not kept (the gradient is rank one); "
                                      "detach the direction or use backend='reference'")
        if create_graph:  # the coefficients as differentiable functions of z (whose grad_fn is this node)
            coef = ops.weighted_psi(z, reference, weight, norm=ctx.norm, delta=ctx.delta)[1]
        g = grad_loss
        c = None if g is None else coef * g            # dL/dz through the loss, per row
        c_all = c if grad_z is None else (grad_z if c is None else c + grad_z)
        grad_h = grad_r = grad_ref = grad_w = None
        if need_h and c_all is not None:
            if create_graph:
                grad_h = torch.outer(c_all, r).to(ctx.dtype)
            elif grad_z is None:
                grad_h = ops.BACKWARD[ctx.backend](coef, r, g.to(r.dtype), None, ctx.dtype)
            else:
                grad_h = ops.BACKWARD[ctx.backend](c_all, r, c_all.new_ones(()), None, ctx.dtype)
        if g is not None:
            if need_r:
                grad_r = hc * g
            if need_ref:
                grad_ref = (-c).to(reference.dtype)
            if need_w:
                grad_w = (g * _unweighted_psi(z, reference, ctx.norm, ctx.delta)).to(weight.dtype)
        return grad_h, grad_r, grad_ref, grad_w, None, None, None


def _scale_as(scale: Scale, dtype: torch.dtype, device: torch.device) -> Tensor:
    """scale as a 0-d tensor of ``dtype`` (no operator when it already is one)."""
    if isinstance(scale, Tensor):
        return scale if scale.dtype == dtype else scale.to(dtype)
    return torch.full((), scale, dtype=dtype, device=device)


class AnchorProjectionFunction(torch.autograd.Function):
    """Identity on H in forward (plus the detached unscaled penalty); backward adds scale * c (outer) r_hat
    to the incoming gradient, and gives the vector gradients above with g = scale (the penalty is
    backpropagated with gradient 1), and dL/dscale = the unscaled penalty. H may be [..., D] (the
    ops flatten it): the hooks pass a layer's [B, T, D] input as it is."""

    @staticmethod
    def forward(ctx, hidden: Tensor, r: Tensor, reference, weight, scale: Scale, norm: int, delta: Delta,
                backend: str):
        need_coef, need_hc = _needs(ctx)
        z, coef, loss, hc = ops.FORWARD[backend](hidden, r, reference, weight, norm, *_split_delta(delta),
                                                 need_coef, need_hc)
        g = _scale_as(scale, r.dtype, r.device)
        # z and z0 only when the weight needs a gradient (psi(z - z0)): the training path keeps c and r alone.
        need_w = ctx.needs_input_grad[3]
        ctx.save_for_backward(coef, r, g, z if need_w else None, reference if need_w else None, hc, loss)
        ctx.norm, ctx.delta, ctx.backend, ctx.dtype = norm, delta, backend, hidden.dtype
        ctx.dtypes = [t.dtype if isinstance(t, Tensor) else None for t in (reference, weight, scale)]
        ctx.mark_non_differentiable(loss)
        # no zeros made for the loss's gradient (it is not differentiable); grad_out is never None:
        # the node runs only when the output H has a gradient
        ctx.set_materialize_grads(False)
        return hidden.view_as(hidden), loss

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_penalty):
        if _create_graph():
            raise _higher_order_error("anchor_projection", "(its backward injects the penalty's gradient, which a "
                                      "second differentiation would inject again); use procon_penalty for "
                                      "higher-order gradients")
        coef, r, g, z, reference, hc, loss = ctx.saved_tensors
        need_h, need_r, need_ref, need_w, need_scale = ctx.needs_input_grad[:5]
        ref_dtype, w_dtype, scale_dtype = ctx.dtypes
        grad_h = grad_r = grad_ref = grad_w = grad_scale = None
        if need_h:
            if grad_out.stride(-1) != 1:
                grad_out = grad_out.contiguous()
            grad_h = ops.BACKWARD[ctx.backend](coef, r, g, grad_out, ctx.dtype)
        if need_r:
            grad_r = hc * g
        if need_ref:
            grad_ref = (-(coef * g)).to(ref_dtype)
        if need_w:
            grad_w = (g * _unweighted_psi(z, reference, ctx.norm, ctx.delta)).to(w_dtype)
        if need_scale:
            grad_scale = loss.to(scale_dtype)
        return grad_h, grad_r, grad_ref, grad_w, grad_scale, None, None, None


# ---------------------------------------------------------------------------------------------
# functional API


def _prepare(hidden, direction, reference, weight, norm, delta, scale, backend, validate):
    _check_inputs(hidden, direction, reference, weight, norm, delta, scale, backend, validate)
    backend = resolve_backend(backend, hidden)
    h2 = hidden.reshape(-1, hidden.shape[-1])  # a view whenever the strides allow
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    reference = excluding_weight_zero(reference, weight)
    return h2, ops.unit_direction(direction, hidden.dtype), _rows(reference), _rows(weight), backend


def _as_delta(delta: Delta) -> Delta:
    return delta if isinstance(delta, Tensor) else float(delta)


def procon_penalty(hidden: Tensor, direction: Tensor, reference: Optional[Tensor] = None,
                   weight: Optional[Tensor] = None, *, norm: str = "l1", delta: Delta = 1.0,
                   scale: Scale = 1.0, backend: str = "auto", return_projection: bool = False,
                   validate: bool = True):
    """ProCon projection penalty, differentiable in ``hidden``.

    Args:
        hidden: [N, D] or [B, T, D] hidden states, bf16 / fp16 / fp32 / fp64; any strides
            (a contiguous last dim avoids a copy).
        direction: [D] refusal direction, any float dtype; normalised to unit length here.
        reference: z0, hidden's leading shape ([N] or [B, T]), any float dtype; None = zeros.
        weight: per-token weights of hidden's leading shape, bool or float; 0 excludes a token
            (prompt, padding). None = all ones.
        norm: "l1" (|d|, the paper's choice; subgradient 0 at 0), "l2sq" (d^2), "huber"
            (0.5 d^2 for |d| <= delta, else delta (|d| - delta / 2)) or "band" (max(|d| - delta, 0):
            an insensitive band of half-width delta around z0, inside which the gradient is exactly 0;
            outside it the gradient is l1's, sign(d)).
        delta: Huber's threshold or the band's half-width (ignored by l1 and l2sq): a finite
            number >= 0 (> 0 for huber), or a 0-d float tensor on hidden's device that does not
            require grad (e.g. one row of per-layer widths: no host sync, one compiled graph).
        scale: a Python number or a 0-d tensor (e.g. alpha / global sample count, no host sync).
        backend: "auto" (triton on CUDA, torch otherwise), "triton", "torch" or "reference".
        return_projection: also return z = hidden . r_hat (detached).
        validate: check the direction's values (finite, non-zero); costs a host sync on GPU.
            Skipped under torch.compile.

    Gradients flow to hidden, direction, reference, a float weight and a tensor scale when they
    require grad. Double backward (create_graph=True) is exact in hidden, reference, weight and
    scale; it raises RuntimeError when the direction requires grad.

    Returns:
        loss: 0-d tensor, fp32 (fp64 for fp64 hidden); with return_projection, (loss, z) where z
        has hidden's leading shape, fp32 (fp64 for fp64 hidden).
    """
    if backend == "reference":
        _check_inputs(hidden, direction, reference, weight, norm, delta, scale, backend, validate)
        reference = excluding_weight_zero(reference, weight)
        loss, z = ops.procon_penalty_ref(hidden, direction, reference, weight, norm=norm, delta=delta, scale=scale)
        return (loss, z.detach()) if return_projection else loss
    h2, r, ref, w, backend = _prepare(hidden, direction, reference, weight, norm, delta, scale, backend, validate)
    loss, z = ProConPenaltyFunction.apply(h2, r, ref, w, ops.NORMS[norm], _as_delta(delta), backend)
    loss = loss * scale   # outside the Function: autograd gives dL/dscale (the unscaled loss)
    return (loss, z.detach().view(hidden.shape[:-1])) if return_projection else loss


def anchor_projection(hidden: Tensor, direction: Tensor, reference: Optional[Tensor] = None,
                      weight: Optional[Tensor] = None, *, norm: str = "l1", delta: Delta = 1.0,
                      scale: Scale = 1.0, backend: str = "auto", validate: bool = True) -> tuple[Tensor, Tensor]:
    """Injection form of ``procon_penalty`` for training loops.

    Returns ``(hidden_out, penalty)``: ``hidden_out`` equals ``hidden`` (same shape and values;
    use it in place of ``hidden`` downstream) and its backward adds the penalty's gradient,
    scale * c (outer) r_hat, to the incoming gradient in one fused pass. ``penalty`` is the
    detached 0-d penalty value (equal to ``procon_penalty``'s), for logging without a host sync.
    The total gradient is that of (downstream loss + penalty), for every argument that requires
    grad (scale included). Arguments as in ``procon_penalty``; backend "reference" adds the
    reference penalty to the graph through a zero-valued term. Double backward raises
    RuntimeError on the fused backends (the injected gradient would be injected again).
    """
    if backend == "reference":
        loss = procon_penalty(hidden, direction, reference, weight, norm=norm, delta=delta, scale=scale,
                              backend="reference", validate=validate)
        return _AddGradOf.apply(hidden, loss), loss.detach()
    h2, r, ref, w, backend = _prepare(hidden, direction, reference, weight, norm, delta, scale, backend, validate)
    out, loss = AnchorProjectionFunction.apply(h2, r, ref, w, scale, ops.NORMS[norm], _as_delta(delta), backend)
    return out.view(hidden.shape), loss * _scale_as(scale.detach() if isinstance(scale, Tensor) else scale,
                                                    loss.dtype, loss.device)


class _AddGradOf(torch.autograd.Function):
    """Returns x; backward also sends a gradient of 1 into `loss` (the unfused reference form)."""

    @staticmethod
    def forward(ctx, x: Tensor, loss: Tensor):
        ctx.loss_dtype = loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, torch.ones((), dtype=ctx.loss_dtype, device=grad_out.device)


class ProConPenalty(torch.nn.Module):
    """Module form holding one direction: ``ProConPenalty(direction, norm="l1")(hidden, z0, w)``."""

    def __init__(self, direction: Tensor, *, norm: str = "l1", delta: Delta = 1.0, backend: str = "auto"):
        super().__init__()
        # Everything about the direction and options is checked here, once: forward skips the
        # value checks (they would cost a host sync per call on GPU).
        _check_float("direction", direction)
        if direction.dim() != 1:
            raise ValueError(f"direction must be 1-D [D], got shape {tuple(direction.shape)}")
        _check_direction_values(direction)
        check_options(norm, delta, backend)
        _check_delta_value(norm, delta)
        self.register_buffer("direction", direction.detach().float().clone())
        if isinstance(delta, Tensor):   # a buffer: it follows the module's .to(device)
            self.register_buffer("delta", delta.detach().clone())
        else:
            self.delta = delta
        self.norm, self.backend = norm, backend

    def forward(self, hidden: Tensor, reference: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                scale: Scale = 1.0) -> Tensor:
        return procon_penalty(hidden, self.direction, reference, weight, norm=self.norm, delta=self.delta,
                              scale=scale, backend=self.backend, validate=False)

    def extra_repr(self) -> str:
        return f"D={self.direction.numel()}, norm={self.norm!r}, delta={self.delta}, backend={self.backend!r}"
