"""Loss normalisation that does not depend on the process count or the micro-batch split.

Each micro-batch contributes sums; the divisors are counts over the whole optimizer step on
all processes (known on the host from the step's sample indices, so they cost no collective):

- CE = (sum over every response-token prediction of -log p) / (global number of predictions)
- ProCon, reduction "sample" (the paper's) = alpha * (sum over samples, layers and response
  tokens of psi(z - z0)) / (global number of samples); "token" divides by the global number of
  response tokens instead (a per-token mean, still summed over layers).

FSDP averages gradients over processes (reduce-scatter with a 1/world divisor, which gloo and
nccl both support), so the per-process loss is multiplied by the world size: the sum over
processes of the per-process gradients is then the gradient of the global mean.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.data.tokenize import TokenizedExample


def shift_labels(labels: Tensor) -> Tensor:
    """[B, T] labels -> [B, T] next-token targets (position t predicts labels[t + 1]; the last is ignored)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def ce_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of token cross-entropies. logits [B, T, V] (any float dtype; math in fp32),
    targets [B, T] long (from :func:`shift_labels`) -> 0-d fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def example_counts(example: TokenizedExample) -> tuple[int, int]:
    """(CE terms, ProCon terms per layer) of one example: response tokens after the first
    position (predicted), and response tokens at input positions (labels != -100)."""
    n_response = sum(label != IGNORE_INDEX for label in example.labels)
    return n_response - (example.labels[0] != IGNORE_INDEX), n_response
