"""Deterministic, rank-sharded batches: which samples each process sees at each optimizer step.

Epoch e visits the examples in the order ``randperm(n, seed=(seed, e))``; optimizer step s of
that epoch takes the next ``batch_size`` of them (the global batch; a last partial batch is
dropped). The global batch is cut into ``world_size * grad_accum`` micro-batches of
``micro_batch_size``; micro-batch j goes to rank ``j % world_size`` as its accumulation step
``j // world_size``. So the samples of a step, and the step's gradient, do not depend on the
process count or the micro-batch split, and the data position is a function of the step alone
(resuming needs only the step number).
"""
from __future__ import annotations

import torch

from fastprocon.data import TokenizedExample, collate


class StepBatches:
    """Micro-batches per optimizer step for one rank.

    Args:
        examples: the tokenized training set.
        batch_size: samples per optimizer step over all processes.
        micro_batch_size: samples per forward pass on one process.
        world_size, rank: this process's place.
        seed: data-order seed.
        pad_id: padding token id (each micro-batch is padded to its own longest sequence).
    """

    def __init__(self, examples: list[TokenizedExample], *, batch_size: int, micro_batch_size: int,
                 world_size: int, rank: int, seed: int, pad_id: int):
        per_step = micro_batch_size * world_size
        if batch_size % per_step:
            raise ValueError(f"train.batch_size = {batch_size} must be a multiple of micro_batch_size x processes "
                             f"= {micro_batch_size} x {world_size} = {per_step}")
        if len(examples) < batch_size:
            raise ValueError(f"the training set has {len(examples)} examples, fewer than one batch "
                             f"(train.batch_size = {batch_size})")
        self.examples = examples
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.world_size, self.rank, self.seed, self.pad_id = world_size, rank, seed, pad_id
        self.grad_accum = batch_size // per_step
        self.steps_per_epoch = len(examples) // batch_size
        self._epoch, self._order = -1, None

    def position(self, step: int) -> dict:
        """Where optimizer step ``step`` (0-based) reads: epoch and index in that epoch's order."""
        return {"epoch": step // self.steps_per_epoch, "index": (step % self.steps_per_epoch) * self.batch_size}

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=gen).tolist()
            self._epoch = epoch
        return self._order

    def global_indices(self, step: int) -> list[int]:
        """Indices into ``examples`` of the global batch of optimizer step ``step``."""
        pos = self.position(step)
        return self._epoch_order(pos["epoch"])[pos["index"]:pos["index"] + self.batch_size]

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's ``grad_accum`` collated micro-batches for optimizer step ``step``
        (dicts as :func:`fastprocon.data.collate` returns, on CPU)."""
        indices = self.global_indices(step)
        mb = self.micro_batch_size
        out = []
        for accum in range(self.grad_accum):
            j = accum * self.world_size + self.rank
            out.append(collate([self.examples[i] for i in indices[j * mb:(j + 1) * mb]], self.pad_id))
        return out
