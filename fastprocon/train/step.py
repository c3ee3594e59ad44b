"""One training micro-step and one optimizer update, as ``fastprocon train`` runs them; the training
benchmarks call the same functions, so what they time is what the trainer does.

A micro-step: arm the ProCon hooks (response mask, z0, scale), forward (the output layer returns the
CE sum when chunked CE is installed, else CE from the full logits), backward of ``CE sum * ce_factor``
(``ce_factor`` = world size / the step's global prediction count, train/loss.py), disarm. The penalty's
gradient rides in the same backward (the hooks inject it at each constrained layer's input).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from fastprocon.models.layers import unwrap_model
from fastprocon.procon.hooks import ProConHooks
from fastprocon.train.chunked_ce import OutputLayerLoss, predicted_positions
from fastprocon.train.loss import ce_sum


def pinned(t, pin: bool = True):
    """A CPU batch tensor in page-locked memory when ``pin`` (for a CUDA device: the copy to it can
    then overlap the computation); anything else (an int argument) as it is."""
    if not pin or not isinstance(t, torch.Tensor) or t.is_pinned():
        return t
    return t.pin_memory()


def to_device(t, device: torch.device):
    """Copy a CPU batch tensor to ``device`` without blocking the host (pinned staging on CUDA,
    unless already pinned: see :func:`pinned`); anything else (an int argument) as it is."""
    if device.type != "cuda" or not isinstance(t, torch.Tensor):
        return t
    return pinned(t).to(device, non_blocking=True)


def ce_targets(targets: Tensor, output_loss: OutputLayerLoss | None, pin: bool = False) -> tuple:
    """What the CE of ``targets`` [B, T] (long, CPU) needs on the host, made ahead of the forward
    (the trainer's prefetch thread does it): (predicted flat positions [n], their targets [n]) for
    the chunked output layer, else (targets,); pinned when ``pin`` (see :func:`pinned`)."""
    if output_loss is None:
        return (pinned(targets, pin),)
    index = predicted_positions(targets)
    return pinned(index, pin), pinned(targets.flatten()[index], pin)


def forward_ce_sum(model: torch.nn.Module, inputs: dict, targets: Tensor, device: torch.device,
                   output_loss: OutputLayerLoss | None = None, prepared: tuple | None = None
                   ) -> tuple[Tensor, Tensor | None]:
    """Forward pass -> (the summed CE of ``targets`` [B, T] (long, CPU; -100 = no prediction) as a 0-d
    fp32 tensor on ``device``, the router's weighted auxiliary loss or None). The CE goes through the
    chunked output layer when ``output_loss`` is installed (the logits never exist in full), else
    from the full logits. A mixture-of-experts model configured to return its router's
    load-balancing loss (``output_router_logits``) adds ``router_aux_loss_coef * aux_loss`` to its
    own loss: that term is returned too. ``prepared``: :func:`ce_targets` of ``targets`` and
    ``output_loss``, made ahead (None: made here)."""
    prepared = ce_targets(targets, output_loss) if prepared is None else prepared
    if output_loss is not None:
        output_loss.arm(to_device(prepared[0], device), to_device(prepared[1], device))
    try:
        out = model(**inputs, use_cache=False)
    finally:
        if output_loss is not None:
            output_loss.disarm()
    # with the chunked output layer, "logits" is already the CE sum
    ce = out.logits if output_loss is not None else ce_sum(out.logits, to_device(prepared[0], device))
    aux = getattr(out, "aux_loss", None)
    coef = getattr(unwrap_model(model).config, "router_aux_loss_coef", None)
    return ce, (coef * aux if aux is not None and coef else None)


def micro_step(model: torch.nn.Module, inputs: dict, targets: Tensor, ce_factor: float, device: torch.device, *,
               output_loss: OutputLayerLoss | None = None, hooks: ProConHooks | None = None,
               weight: Tensor | None = None, z0: Tensor | None = None, scale: Tensor | None = None,
               aux_factor: float = 1.0, prepared_targets: tuple | None = None) -> Tensor:
    """Forward and backward of one micro-batch, adding into the parameters' gradients.

    inputs: the model's keyword inputs on ``device``; targets: [B, T] next-token labels (CPU).
    With ``scale`` (0-d fp32 tensor, alpha * normaliser), ``hooks`` are armed with ``weight`` [B, T]
    (response mask) and ``z0`` [n_layers, B, T] for this forward and its backward.
    A router auxiliary loss the model returns (mixture of experts) is added times ``aux_factor``
    (1 / this process's micro-batches of the step: their mean, which FSDP then averages over processes).
    ``prepared_targets``: :func:`ce_targets` made ahead (the trainer's prefetch thread), or None.
    Returns the detached CE sum (0-d fp32); the penalty stays in ``hooks.take_penalty()``.
    """
    if scale is not None:
        hooks.arm(weight, z0, scale)
    try:
        ce, aux = forward_ce_sum(model, inputs, targets, device, output_loss, prepared_targets)
        loss = ce * ce_factor
        if aux is not None:   # the model's own loss adds it per forward: a mean over the micro-batches
            loss = loss + aux * aux_factor
        loss.backward()
    finally:
        if scale is not None:
            hooks.disarm()
    return ce.detach()


def make_optimizer(params: list[Tensor], device: torch.device, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused where torch has a fused kernel for ``device`` (CUDA), else the foreach version."""
    fused = device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def optimizer_update(params: list[Tensor], optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                     max_norm: float = math.inf) -> Tensor:
    """Clip the gradients to ``max_norm`` (inf: measure only), step the optimizer (and the LR
    scheduler), clear the gradients. Returns the total gradient norm before clipping (0-d tensor,
    a plain tensor also for FSDP2's DTensor gradients; no host sync)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
