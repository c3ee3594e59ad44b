"""ProCon at decoder-layer inputs: forward pre-hooks that inject the projection penalty.

:class:`ProConHooks` puts a forward pre-hook on each constrained decoder layer. While armed
(:meth:`ProConHooks.arm`), the hook passes the layer input through the autograd Function behind
:func:`fastprocon.anchor_projection` with that layer's direction, the batch's z0 row and the
response-token mask, so the usual ``loss.backward()`` also carries the ProCon gradient. The
detached per-layer penalties are summed for logging without a host sync.

The per-layer path is lean: what does not change within a step is prepared once. The unit
directions (fp32, and fp64 for fp64 hidden states) at construction, the backend and the options
(checked there, as the public API checks them); the flattened weight and the z0 rows (with the
weight-0 non-finite entries zeroed, as the public API does per call) once per micro-batch in
:meth:`~ProConHooks.arm`. A layer then costs the Function's own ops only (see docs/performance.md):
its inputs are checked by shape alone (Python, no operator).

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
from fastprocon.penalty import ops
from fastprocon.penalty.functional import (
    AnchorProjectionFunction,
    anchor_projection,
    check_options,
    excluding_weight_zero,
    procon_penalty,
    resolve_backend,
)
from fastprocon.refusal.steering import on_layer_inputs


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpoint recomputation happens).
    Code traced by torch.compile is the forward (its backward is a compiled graph): False."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class LayerRow:
    """What one constrained layer's hook reads: its unit direction (fp32 ``unit``, fp64 ``unit64``,
    [D]), its delta (a float, or a 0-d view of the widths) and, while armed, its z0 row [B * T].
    Passed to the hook as its key: under torch.compile the tensors are graph inputs, so one graph
    serves every layer (a Python int key would be guarded on: one graph per layer)."""

    def __init__(self, row: int, direction: Tensor, delta: float | Tensor):
        self.row = row
        # exactly what the public API computes per call (ops.unit_direction), computed once
        self.unit = ops.unit_direction(direction, torch.float32)
        self.unit64 = ops.unit_direction(direction, torch.float64)
        self.delta = delta
        self.z0: Tensor | None = None


class ProConHooks:
    """ProCon forward pre-hooks on the decoder layers of ``model`` (see the module docstring).

    Args:
        model: the model (PEFT/FSDP/checkpoint-wrapped or not); the hooks go on the modules in
            ``models.decoder_layers(model)`` when :meth:`installed` is entered.
        layer_ids: the constrained layers, in the order of the rows of ``directions`` and of z0.
        directions: [len(layer_ids), D] directions (fp32; normalised here), on the model's device.
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
        check_options(norm, delta, backend)
        self.model, self.layer_ids = model, layer_ids
        self._run_order = sorted(range(len(layer_ids)), key=lambda row: layer_ids[row])   # rows, in layer order
        self.directions = directions
        self.norm, self.delta, self.backend = norm, delta, backend
        self._norm_code = ops.NORMS[norm]
        # "auto" -> the fused backend of the directions' device (the hidden states' device)
        self._fused = backend if backend == "reference" else resolve_backend(backend, directions)
        self._rows = [LayerRow(row, directions[row], float(delta)) for row in range(len(layer_ids))]
        self.widths: Tensor | None = None
        if widths is not None:
            self.set_widths(widths)
        self._weight: Tensor | None = None     # [B, T] as given (the reference backend's input)
        self._weight_rows: Tensor | None = None   # [B * T]
        self._z0: Tensor | None = None
        self._scale: Tensor | float | None = None
        # summed in the hook (a list append would be guarded on its length under torch.compile)
        self._zero = torch.zeros((), device=directions.device)
        self._penalty_total = self._zero
        self._recorded: list[Tensor] | None = None

    @contextmanager
    def installed(self) -> Iterator["ProConHooks"]:
        """Hooks on the constrained layers for the duration of the block (removed on exit)."""
        with on_layer_inputs(self.model, self._on_layer_input, self.layer_ids, keys=self._rows):
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
        for layer in self._rows:
            layer.delta = self.widths[layer.row]

    # -- per-batch inputs ------------------------------------------------------------------------

    def arm(self, weight: Tensor, z0: Tensor, scale: Tensor | float) -> None:
        """Constrain the next forward passes.

        weight: [B, T] bool/float response-token mask (labels != -100 at input positions).
        z0: [len(layer_ids), B, T] reference projections. scale: 0-d tensor or float
        (alpha * normaliser); it multiplies the penalty's gradient (the logged penalty is unscaled).
        """
        if z0.dim() != 3 or z0.shape[0] != len(self.layer_ids) or z0.shape[1:] != weight.shape:
            raise ValueError(f"z0 must be [{len(self.layer_ids)}, B, T] matching weight {tuple(weight.shape)}, "
                             f"got {tuple(z0.shape)}")
        if self.norm == "band" and self.widths is None:
            raise RuntimeError("norm='band' needs the per-layer band widths: pass widths= (or call set_widths) "
                               "before arming the hooks")
        if not (weight.dtype == torch.bool or weight.is_floating_point()) or not z0.is_floating_point():
            raise TypeError(f"weight must be a bool or float tensor and z0 a float tensor, got {weight.dtype} and "
                            f"{z0.dtype}")
        for name, t in (("weight", weight), ("z0", z0), ("scale", scale)):
            if isinstance(t, Tensor) and t.device != self.directions.device:
                raise ValueError(f"{name} is on {t.device} but the directions are on {self.directions.device}")
        self._weight, self._z0, self._scale = weight, z0, scale
        if self._fused != "reference":   # once per micro-batch what the public API does at every layer
            self._weight_rows = weight.reshape(-1)
            for layer, z0_row in zip(self._rows, excluding_weight_zero(z0, weight).flatten(1).unbind(0)):
                layer.z0 = z0_row

    def disarm(self) -> None:
        self._weight = self._z0 = self._scale = self._weight_rows = None
        for layer in self._rows:
            layer.z0 = None

    @property
    def armed(self) -> bool:
        return self._weight is not None

    def take_penalty(self) -> Tensor:
        """Sum of the unscaled penalties sum_i w_i psi(z_i - z0_i) of the layers run since the last
        call, as a 0-d tensor on the device (no host sync; zeros when none ran)."""
        total = self._penalty_total
        self._penalty_total = self._zero
        return total if total is not self._zero else torch.zeros_like(self._zero)

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

    def _on_layer_input(self, layer: LayerRow, hidden: Tensor) -> Tensor | None:
        if self._weight is None and self._recorded is None:
            return None
        if self._fused == "reference":   # the unfused baseline: the public API, as it is
            return self._reference_path(layer, hidden)
        if hidden.shape[-1] != layer.unit.shape[0] or (self._weight is not None
                                                       and hidden.shape[:-1] != self._weight.shape):
            raise ValueError(self._shape_error(layer, hidden))
        unit = layer.unit64 if hidden.dtype == torch.float64 else layer.unit
        if hidden.stride(-1) != 1:
            hidden = hidden.contiguous()
        if self._recorded is not None:
            z = ops.FORWARD[self._fused](hidden.detach(), unit, None, None, self._norm_code, float(self.delta), None,
                                         False, False)[0]
            self._recorded.append(z.view(hidden.shape[:-1]))
            return None
        # [B, T, D] as it is: the ops see it as [B * T, D] rows (no reshape, no view back)
        out, penalty = AnchorProjectionFunction.apply(hidden, unit, layer.z0, self._weight_rows, self._scale,
                                                      self._norm_code, layer.delta, self._fused)
        if not _in_backward():   # else a checkpoint recomputation: already logged in the forward
            self._penalty_total = self._penalty_total + penalty
        return out

    def _shape_error(self, layer: LayerRow, hidden: Tensor) -> str:
        armed = f" and the armed weight is {tuple(self._weight.shape)}" if self._weight is not None else ""
        return (f"layer {self.layer_ids[layer.row]} input is {tuple(hidden.shape)}, but the directions have "
                f"D = {layer.unit.shape[0]}{armed}")

    def _reference_path(self, layer: LayerRow, hidden: Tensor) -> Tensor | None:
        direction = self.directions[layer.row]
        if self._recorded is not None:
            _, z = procon_penalty(hidden.detach(), direction, norm=self.norm, delta=layer.delta,
                                  backend="reference", return_projection=True, validate=False)
            self._recorded.append(z)
            return None
        hidden, penalty = anchor_projection(hidden, direction, self._z0[layer.row], self._weight, norm=self.norm,
                                            delta=layer.delta, scale=self._scale, backend="reference",
                                            validate=False)
        if not _in_backward():
            self._penalty_total = self._penalty_total + penalty / self._scale
        return hidden


def stack_recorded(recorded: list[Tensor | None]) -> Tensor:
    """The list filled by :meth:`ProConHooks.recording` as one [n_layers, B, T] tensor."""
    if any(z is None for z in recorded):
        missing = [i for i, z in enumerate(recorded) if z is None]
        raise RuntimeError(f"no projection was recorded for constrained rows {missing}: did the forward pass run?")
    return torch.stack(recorded)
