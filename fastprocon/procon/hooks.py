"""ProCon at decoder-layer inputs: forward pre-hooks that inject the projection penalty.

:class:`ProConHooks` puts a forward pre-hook on each constrained decoder layer. While armed
(:meth:`ProConHooks.arm`), the hook passes the layer input through
:func:`fastprocon.anchor_projection` with that layer's direction, the batch's z0 slice and the
response-token mask, so the usual ``loss.backward()`` also carries the ProCon gradient. The
detached per-layer penalties are kept for logging and summed without a host sync.

Activation checkpointing: install the hooks on the modules that the model calls (the
checkpoint wrappers, when layers are wrapped), so they run once, outside the recomputed
region. If a hook sits inside a checkpointed region anyway, the backward-time recomputation
calls it a second time: the gradient is still counted once (non-reentrant checkpointing
reuses the first forward's graph; reentrant checkpointing builds the graph only in the
recomputation), and the recomputed penalty is not logged again.

Disarmed hooks (alpha = 0) return at once: no kernel launch, no allocation.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from fastprocon.models.layers import decoder_layers
from fastprocon.penalty.functional import anchor_projection, procon_penalty
from fastprocon.refusal.steering import on_layer_inputs


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpoint recomputation happens).
    Code traced by torch.compile is the forward (its backward is a compiled graph): False."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class ProConHooks:
    """ProCon forward pre-hooks on the decoder layers of ``model`` (see the module docstring).

    Args:
        model: the model (PEFT/FSDP/checkpoint-wrapped or not); the hooks go on the modules in
            ``models.decoder_layers(model)`` when :meth:`installed` is entered.
        layer_ids: the constrained layers, in the order of the rows of ``directions`` and of z0.
        directions: [len(layer_ids), D] unit directions (fp32), on the model's device.
        norm, delta, backend: as in :func:`fastprocon.procon_penalty`.
        widths: [len(layer_ids)] per-layer delta (fp32, on the directions' device), one value per
            constrained layer in place of ``delta``: the band's half-widths for ``norm="band"``
            (see :func:`fastprocon.procon.setup.band_widths`), which needs them (here or through
            :meth:`set_widths` before the first :meth:`arm`).
    """

    def __init__(self, model: nn.Module, layer_ids: Sequence[int], directions: Tensor, *,
                 norm: str = "l1", delta: float = 1.0, backend: str = "auto", widths: Tensor | None = None):
        layer_ids = [int(l) for l in layer_ids]
        if directions.dim() != 2 or directions.shape[0] != len(layer_ids):
            raise ValueError(f"directions must be [{len(layer_ids)}, D] (one row per constrained layer), "
                             f"got {tuple(directions.shape)}")
        n_layers = len(decoder_layers(model))
        bad = [l for l in layer_ids if not 0 <= l < n_layers]
        if bad or len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"layer_ids {layer_ids} must be distinct indices in 0..{n_layers - 1} "
                             f"(the model has {n_layers} decoder layers)")
        self.model, self.layer_ids = model, layer_ids
        # rows as [1] index tensors (index_select: no host sync): under torch.compile one graph serves
        # every layer (a Python int would be guarded on, one graph per layer)
        self._row_keys = [torch.tensor([row], device=directions.device) for row in range(len(layer_ids))]
        self._run_order = sorted(range(len(layer_ids)), key=lambda row: layer_ids[row])   # rows, in layer order
        self.directions = directions
        self.norm, self.delta, self.backend = norm, delta, backend
        self.widths: Tensor | None = None
        if widths is not None:
            self.set_widths(widths)
        self._weight: Tensor | None = None
        self._z0: Tensor | None = None
        self._scale: Tensor | None = None
        # summed in the hook (a list append would be guarded on its length under torch.compile)
        self._penalty_none = torch.zeros((), device=directions.device)
        self._penalty_total = self._penalty_none
        self._recorded: list[Tensor] | None = None

    @contextmanager
    def installed(self) -> Iterator["ProConHooks"]:
        """Hooks on the constrained layers for the duration of the block (removed on exit)."""
        with on_layer_inputs(self.model, self._on_layer_input, self.layer_ids, keys=self._row_keys):
            yield self

    def set_widths(self, widths: Tensor) -> None:
        """Per-layer delta, [len(layer_ids)] finite and >= 0, one per row of ``directions``
        (checked here once: the hooks then read a row without a host sync)."""
        if widths.dim() != 1 or widths.shape[0] != len(self.layer_ids) or not widths.is_floating_point():
            raise ValueError(f"widths must be a float [{len(self.layer_ids)}] tensor (one per constrained layer), "
                             f"got {widths.dtype} {tuple(widths.shape)}")
        if not bool((torch.isfinite(widths) & (widths >= 0)).all()):
            raise ValueError(f"widths must be finite and >= 0, got {widths.tolist()}")
        self.widths = widths.detach().to(self.directions.device)

    # -- per-batch inputs ------------------------------------------------------------------------

    def arm(self, weight: Tensor, z0: Tensor, scale: Tensor | float) -> None:
        """Constrain the next forward passes.

        weight: [B, T] bool/float response-token mask (labels != -100 at input positions).
        z0: [len(layer_ids), B, T] reference projections. scale: 0-d tensor or float
        (alpha * normaliser); it multiplies the penalty and its gradient.
        """
        if z0.dim() != 3 or z0.shape[0] != len(self.layer_ids) or z0.shape[1:] != weight.shape:
            raise ValueError(f"z0 must be [{len(self.layer_ids)}, B, T] matching weight {tuple(weight.shape)}, "
                             f"got {tuple(z0.shape)}")
        if self.norm == "band" and self.widths is None:
            raise RuntimeError("norm='band' needs the per-layer band widths: pass widths= (or call set_widths) "
                               "before arming the hooks")
        self._weight, self._z0, self._scale = weight, z0, scale

    def disarm(self) -> None:
        self._weight = self._z0 = self._scale = None

    @property
    def armed(self) -> bool:
        return self._weight is not None

    def take_penalty(self) -> Tensor | None:
        """Sum of the penalties (scale included) logged since the last call, as a 0-d tensor
        (no host sync); None when none ran."""
        total = self._penalty_total
        if total is self._penalty_none:      # no hook added to it
            return None
        self._penalty_total = self._penalty_none
        return total

    @contextmanager
    def recording(self):
        """Within this block, hooks record z = h . r_hat per constrained layer instead of
        constraining; yields a list filled with [B, T] fp32 tensors (see :func:`stack_recorded`)."""
        if self.armed:
            raise RuntimeError("cannot record projections while the hooks are armed")
        self._recorded = []      # filled in the order the layers run
        result: list[Tensor | None] = [None] * len(self.layer_ids)
        try:
            yield result
        finally:
            for row, z in zip(self._run_order, self._recorded):
                result[row] = z
            self._recorded = None

    # -- the hook --------------------------------------------------------------------------------

    def _on_layer_input(self, row: Tensor, hidden: Tensor) -> Tensor | None:
        if self._weight is None and self._recorded is None:
            return None
        direction = self.directions.index_select(0, row)[0]
        if self._recorded is not None:
            _, z = procon_penalty(hidden.detach(), direction, norm=self.norm, delta=self.delta,
                                  backend=self.backend, return_projection=True, validate=False)
            self._recorded.append(z)
            return None
        delta = self.delta if self.widths is None else self.widths.index_select(0, row)[0]
        hidden, penalty = anchor_projection(
            hidden, direction, self._z0.index_select(0, row)[0], self._weight, norm=self.norm, delta=delta,
            scale=self._scale, backend=self.backend, validate=False)
        if not _in_backward():   # else a checkpoint recomputation: already logged in the forward
            self._penalty_total = self._penalty_total + penalty
        return hidden


def stack_recorded(recorded: list[Tensor | None]) -> Tensor:
    """The list filled by :meth:`ProConHooks.recording` as one [n_layers, B, T] tensor."""
    if any(z is None for z in recorded):
        missing = [i for i, z in enumerate(recorded) if z is None]
        raise RuntimeError(f"no projection was recorded for constrained rows {missing}: did the forward pass run?")
    return torch.stack(recorded)
