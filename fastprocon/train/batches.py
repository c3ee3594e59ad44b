"""Deterministic, rank-sharded batches: which samples each process sees at each optimizer step.

Epoch e visits the examples in the order ``randperm(n, seed=(seed, e))``; optimizer step s of
that epoch takes the next ``batch_size`` of them (the global batch; a last partial batch is
dropped). The global batch is cut into ``world_size * grad_accum`` micro-batches of
``micro_batch_size``; micro-batch j goes to rank ``j % world_size`` as its accumulation step
``j // world_size``. So the samples of a step, and the step's gradient, do not depend on the
process count or the micro-batch split, and the data position is a function of the step alone
(resuming needs only the step number).

Packed (``tokens_per_row`` set, see :mod:`fastprocon.train.packing`): the same global batch is
grouped into rows of at most ``tokens_per_row`` tokens (first-fit decreasing over the samples'
lengths, a function of the step alone); row j goes to rank ``j % world_size`` as its
accumulation step ``j // world_size``, and a process short of rows runs one-token empty rows,
so every process runs the same number of forward passes. The step's samples, and so its
gradient, are those of the padded plan.
"""
from __future__ import annotations

import torch

from fastprocon.data.tokenize import TokenizedExample, collate
from fastprocon.train.loss import shift_labels
from fastprocon.train.packing import empty_row, pack_collated, pack_like, plan_rows


class StepBatches:
    """Micro-batches per optimizer step for one rank.

    Args:
        examples: the tokenized training set.
        batch_size: samples per optimizer step over all processes.
        micro_batch_size: samples per forward pass on one process.
        world_size, rank: this process's place.
        seed: data-order seed.
        pad_id: padding token id (each micro-batch is padded to its own longest sequence).
        tokens_per_row: pack samples into rows of at most this many tokens (None = pad instead;
            ``micro_batch_size`` is then unused). A longer sample is a ValueError naming it.
    """

    def __init__(self, examples: list[TokenizedExample], *, batch_size: int, micro_batch_size: int,
                 world_size: int, rank: int, seed: int, pad_id: int, tokens_per_row: int | None = None):
        per_step = micro_batch_size * world_size
        if tokens_per_row is not None:
            longest = max(range(len(examples)), key=lambda i: len(examples[i].input_ids), default=None)
            if longest is not None and len(examples[longest].input_ids) > tokens_per_row:
                n_long = sum(len(ex.input_ids) > tokens_per_row for ex in examples)
                raise ValueError(f"example {examples[longest].id} has {len(examples[longest].input_ids)} tokens, "
                                 f"more than a packed row's {tokens_per_row} (train.tokens_per_micro_batch; "
                                 f"{n_long} example(s) are longer): raise it to at least data.max_length")
            if batch_size < world_size:
                raise ValueError(f"train.batch_size = {batch_size} must be at least the number of processes "
                                 f"({world_size})")
        elif batch_size % per_step:
            raise ValueError(f"train.batch_size = {batch_size} must be a multiple of micro_batch_size x processes "
                             f"= {micro_batch_size} x {world_size} = {per_step}")
        if len(examples) < batch_size:
            raise ValueError(f"the training set has {len(examples)} examples, fewer than one batch "
                             f"(train.batch_size = {batch_size})")
        self.examples = examples
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.world_size, self.rank, self.seed, self.pad_id = world_size, rank, seed, pad_id
        self.tokens_per_row = tokens_per_row
        self.grad_accum = batch_size // per_step     # padded plan; packed steps vary (see micro_batches)
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

    def _collate(self, indices: list[int]) -> dict:
        batch = collate([self.examples[i] for i in indices], self.pad_id)
        batch["targets"] = shift_labels(batch["labels"])
        return batch

    def rows(self, step: int) -> list[list[int]]:
        """The global batch of step ``step`` as forward-pass groups of example indices, in
        plan order (group j goes to rank j % world_size): packed rows, or padded micro-batches."""
        indices = self.global_indices(step)
        if self.tokens_per_row is None:
            mb = self.micro_batch_size
            return [indices[j:j + mb] for j in range(0, len(indices), mb)]
        plan = plan_rows([len(self.examples[i].input_ids) for i in indices], self.tokens_per_row)
        return [[indices[p] for p in row] for row in plan]

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches for optimizer step ``step``, on CPU: dicts as
        :func:`fastprocon.data.examples.collate` returns plus "targets" (next-token labels), or packed rows
        (:func:`fastprocon.train.packing.pack_collated`; empty rows where this rank is short)."""
        rows = self.rows(step)
        n_accum = -(-len(rows) // self.world_size)
        out = []
        for accum in range(n_accum):
            j = accum * self.world_size + self.rank
            if j >= len(rows):
                out.append(empty_row(self.pad_id))
            elif self.tokens_per_row is None:
                out.append(self._collate(rows[j]))
            else:
                out.append(pack_collated(self._collate(rows[j])))
        return out


def cached_z0(reference, mb: dict, n_layers: int) -> torch.Tensor:
    """[n_layers, B, T] reference projections of a micro-batch of :meth:`StepBatches.micro_batches`
    (B = 1 for a packed row; zeros for an empty row) from ``reference`` (a
    :class:`fastprocon.procon.reference.ReferenceCache`), on the CPU."""
    if not mb["ids"]:       # an empty row (packing): no response token
        return torch.zeros(n_layers, *mb["input_ids"].shape)
    if "pack_mask" in mb:
        return pack_like(reference.gather(mb["ids"], mb["padded_labels"]), mb["pack_mask"])
    return reference.gather(mb["ids"], mb["labels"])
