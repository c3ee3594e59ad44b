"""Cross entropy without the full logits: the output layer and the loss, in chunks of rows.

The plain loss materialises fp32 logits [B, T, V] for every position (about 4 GB for 8 k tokens
at a 128 k vocabulary) and as much again for their gradient. Here only the positions that are
predicted (target != -100; their indices come from the host with the batch, so no sync) go
through the output layer, a chunk of rows at a time:

- fp32 on torch >= 2.13: ``torch.nn.functional.linear_cross_entropy`` with an explicit
  ``batch_chunk_size`` (its automatic choice is very slow on CPU);
- otherwise (bf16/fp16, where torch's returns the loss in the input dtype: a 350 sum rounded by
  up to 1; or older torch): each chunk's logits (upcast to fp32, as the plain loss does) and CE
  under non-reentrant activation checkpointing, so only one chunk's logits exist at a time, in
  the forward and again in the backward (one more head matmul per token than the plain loss).

:class:`OutputLayerLoss` runs this *inside* the model's forward, in place of its output layer,
so under FSDP2 the head weight is gathered and its gradient reduced by the root module as usual
(and tied embeddings stay tied): while armed with a batch's targets, the output layer returns
the summed CE (a 0-d fp32 tensor) as the forward's ``logits``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.models.layers import unwrap_model
from fastprocon.train.exactness import exceeds

HAS_LINEAR_CE = hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions")
CHUNK_ELEMENTS = 1 << 25     # rows x vocab of one chunk: 128 MiB of fp32 logits


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab`` (CHUNK_ELEMENTS logits, at least 16 rows)."""
    return max(16, CHUNK_ELEMENTS // vocab)


def _ce_sum_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def linear_ce_sum(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                  rows_per_chunk: int | None = None, use_torch: bool | None = None) -> Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets), never holding more than
    one chunk's logits. hidden [N, D] (any float dtype; the logits are upcast to fp32 as the plain
    loss does), weight [V, D], targets [N] long (-100 = ignored) -> 0-d fp32.
    ``use_torch`` None: torch's linear_cross_entropy where it exists, for fp32 inputs."""
    rows = rows_per_chunk or chunk_rows(weight.shape[0])
    if use_torch is None:
        use_torch = HAS_LINEAR_CE and hidden.dtype == torch.float32
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum() * 0).float() * 0   # keeps the graph: FSDP expects a gradient
    if use_torch:
        options = nn.LinearCrossEntropyOptions(batch_chunk_size=min(rows, hidden.shape[0]))
        return F.linear_cross_entropy(hidden, weight, targets, linear_bias=bias, reduction="sum",
                                      ignore_index=IGNORE_INDEX, options=options).float()
    total = None
    for start in range(0, hidden.shape[0], rows):
        part = checkpoint(_ce_sum_chunk, hidden[start:start + rows], weight, bias, targets[start:start + rows],
                          use_reentrant=False)
        total = part if total is None else total + part
    return total


def predicted_positions(targets: Tensor) -> Tensor:
    """Flat indices [n] (long) of the positions of ``targets`` [B, T] that are predicted (on the host)."""
    return (targets.flatten() != IGNORE_INDEX).nonzero().flatten()


class OutputLayerLoss:
    """While armed, the model's output layer returns the summed CE of the armed targets instead
    of logits (see the module docstring); disarmed, it is the plain output layer.

    Args:
        model: the causal LM (PEFT/FSDP-wrapped or not); its ``get_output_embeddings()`` must be
            an ``nn.Linear`` (an untied or tied LM head).
        rows_per_chunk: rows per chunk (None: :func:`chunk_rows` of the vocabulary).
    """

    def __init__(self, model: nn.Module, rows_per_chunk: int | None = None):
        head = unwrap_model(model).get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"the chunked cross entropy needs an nn.Linear output layer, got {type(head).__name__}")
        self.head, self.rows_per_chunk = head, rows_per_chunk
        self._index: Tensor | None = None
        self._targets: Tensor | None = None

    def install(self) -> "OutputLayerLoss":
        """From now on the output layer calls :meth:`_forward` (plain while disarmed)."""
        self.head.forward = self._forward      # an instance attribute: shadows nn.Linear.forward
        return self

    def remove(self) -> None:
        self.head.__dict__.pop("forward", None)

    @contextmanager
    def installed(self) -> Iterator["OutputLayerLoss"]:
        """:meth:`install` for the duration of the block."""
        self.install()
        try:
            yield self
        finally:
            self.remove()

    def arm(self, index: Tensor, targets: Tensor) -> None:
        """index [n] long: flat positions of the next forward's [B, T] rows that are predicted
        (:func:`predicted_positions`); targets [n] long: their target tokens."""
        self._index, self._targets = index, targets

    def disarm(self) -> None:
        self._index = self._targets = None

    def _forward(self, hidden: Tensor) -> Tensor:
        if self._index is None:
            return F.linear(hidden, self.head.weight, self.head.bias)
        rows = hidden.flatten(0, -2).index_select(0, self._index)
        return linear_ce_sum(rows, self.head.weight, self._targets, self.head.bias,
                             rows_per_chunk=self.rows_per_chunk)


@torch.no_grad()
def check_chunked_ce_exact(model: nn.Module, *, length: int = 7, tolerance: float = 1e-3) -> str | None:
    """None when the chunked CE through the output layer equals the CE of the model's own logits on
    this model; else a sentence saying why not. Models that post-process the output layer's result in
    their forward (Granite's ``logits_scaling``, Gemma's final-logit softcapping) would apply that to
    the CE sum. One forward of ``length`` tokens each way: run it on every process together."""
    param = next(model.parameters())
    head = unwrap_model(model).get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"its output layer is a {type(head).__name__}, not an nn.Linear"
    ids = torch.randint(0, head.weight.shape[0], (1, length), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1)
    ids, targets = ids.to(param.device), targets.to(param.device)
    plain = F.cross_entropy(model(input_ids=ids, use_cache=False).logits[0].float(), targets[0],
                            ignore_index=IGNORE_INDEX, reduction="sum")
    loss = OutputLayerLoss(model)
    with loss.installed():
        index = predicted_positions(targets.cpu()).to(param.device)
        loss.arm(index, targets.flatten()[index])
        chunked = model(input_ids=ids, use_cache=False).logits.float()
    if exceeds(chunked, plain, tolerance) is not None:
        return (f"the model's forward changes its output layer's result (CE from its logits {plain.item():.4f}, "
                f"through the output layer {chunked.item():.4f}: logit scaling or softcapping)")
    return None
