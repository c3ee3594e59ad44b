"""Sequence packing: whole samples side by side in one row, each attending only to itself.

A packed row is the concatenation of some samples' tokens, ``position_ids`` restarting at 0 at
every sample and no attention mask: transformers then derives the block-diagonal causal mask
from the position ids (``masking_utils.find_packed_sequence_indices``; sdpa, eager, flex), and
flash-attn gets the variable-length arguments ``cu_seq_lens_q/k`` and ``max_length_q/k``
explicitly (so it needs no host sync to find them). Per sample, the tokens, labels, next-token
targets, response mask and z0 rows are exactly those of the padded batch, in the same order,
with the padding removed; so a packed step computes the same sums as a padded one.

Everything here works on collated (right-padded) micro-batches (:func:`fastprocon.data.examples.collate`)
and on [..., n, T] tensors laid out like them (z0 from the reference cache), so packing composes
with however those are produced:

    plan_rows(lengths, capacity) -> rows          # which samples share a row (first-fit decreasing)
    pack_collated(batch) -> packed micro-batch     # [n, T] padded -> [1, sum(lengths)]
    pack_like(x [..., n, T], mask [n, T]) -> [..., 1, sum(lengths)]
    forward_kwargs(mb) -> the model's keyword arguments for a padded or packed micro-batch
    check_packing_exact(model) -> None | why not   # packed logits == separate logits on this model
    use_packing(setting, model) -> (bool, note)     # data.packing "auto" / "on" / "off"
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.train.exactness import exceeds


def plan_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group samples into rows of at most ``capacity`` tokens: first-fit decreasing.

    lengths: tokens per sample (each <= capacity). Returns rows as lists of positions into
    ``lengths``, each row in increasing position order; a deterministic function of
    ``lengths`` and ``capacity`` alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than a row's {capacity}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def pack_like(x: Tensor, mask: Tensor) -> Tensor:
    """The non-padding positions of ``x`` [..., n, T] (``mask`` [n, T] bool, True = a real
    token) as one packed row [..., 1, sum(mask)], samples in order."""
    return x[..., mask].unsqueeze(-2)


def pack_collated(batch: dict) -> dict:
    """A right-padded micro-batch (:func:`fastprocon.data.examples.collate`, plus "targets") as one packed row.

    Returns input_ids, labels, targets [1, N] long; position_ids [1, N] long (0 at each
    sample's first token); cu_seq_lens [n + 1] int32 (sample boundaries); max_length (int,
    the longest sample); pack_mask [n, T] bool and padded_labels [n, T] (to gather z0 rows as for
    the padded batch, then :func:`pack_like` them); ids.
    """
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return {"input_ids": pack_like(batch["input_ids"], mask), "labels": pack_like(batch["labels"], mask),
            "targets": pack_like(batch["targets"], mask),
            "position_ids": pack_like(mask.long().cumsum(1) - 1, mask),
            "cu_seq_lens": cu, "max_length": int(lengths.max()), "pack_mask": mask, "padded_labels": batch["labels"],
            "ids": batch["ids"]}


def empty_row(pad_id: int) -> dict:
    """A one-token row that predicts nothing and has no response token: what a process runs
    when the step has fewer packed rows than processes x accumulation steps (every process
    must run the same number of forward passes, for FSDP's collectives)."""
    one = torch.full((1, 1), pad_id, dtype=torch.long)
    ignored = torch.full((1, 1), IGNORE_INDEX, dtype=torch.long)
    return {"input_ids": one, "labels": ignored, "targets": ignored.clone(), "position_ids": torch.zeros_like(one),
            "cu_seq_lens": torch.tensor([0, 1], dtype=torch.int32), "max_length": 1,
            "pack_mask": torch.ones(1, 1, dtype=torch.bool), "padded_labels": ignored.clone(), "ids": []}


def forward_kwargs(mb: dict, *, varlen_kwargs: bool) -> dict:
    """The keyword arguments of the model's forward for training micro-batch ``mb`` (padded or
    packed, CPU tensors): input_ids plus attention_mask (padded) or position_ids (packed; with
    ``varlen_kwargs`` also flash-attn's cu_seq_lens_q/k and max_length_q/k)."""
    if "position_ids" not in mb:
        return {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}
    out = {"input_ids": mb["input_ids"], "position_ids": mb["position_ids"]}
    if varlen_kwargs:
        out.update(cu_seq_lens_q=mb["cu_seq_lens"], cu_seq_lens_k=mb["cu_seq_lens"],
                   max_length_q=mb["max_length"], max_length_k=mb["max_length"])
    return out




@torch.no_grad()
def check_packing_exact(model: torch.nn.Module, *, lengths=(5, 3), tolerance: float = 1e-3) -> str | None:
    """None when two samples packed in one row give this model the same logits as run
    separately; else a sentence saying what differed. A few forward passes of ``lengths``
    tokens on the model's device (run it on the unsharded model: no collectives)."""
    param = next(model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    was_training = model.training
    model.eval()
    try:
        alone = [model(input_ids=s[None].to(param.device), use_cache=False).logits[0].float() for s in samples]
        ids = torch.cat(samples)[None]
        attention_mask = torch.ones(len(samples), max(lengths), dtype=torch.long)
        for i, n in enumerate(lengths):
            attention_mask[i, n:] = 0
        padded = torch.zeros(len(samples), max(lengths), dtype=torch.long)
        for i, s in enumerate(samples):
            padded[i, :len(s)] = s
        batch = pack_collated({"input_ids": padded, "labels": padded, "targets": padded,
                               "attention_mask": attention_mask, "ids": []})
        assert torch.equal(batch["input_ids"], ids)
        varlen = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
        kwargs = {k: (v.to(param.device) if isinstance(v, Tensor) else v)
                  for k, v in forward_kwargs(batch, varlen_kwargs=varlen).items()}
        packed = model(**kwargs, use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    bad = exceeds(packed, torch.cat(alone), tolerance)
    if bad is not None:
        diff, scale = bad
        return (f"packed samples change each other's logits on this model (max difference {diff:.3g}, "
                f"logits up to {scale:.3g}): its attention does not separate samples by position_ids")
    return None


def use_packing(setting: str, model: torch.nn.Module) -> tuple[bool, str | None]:
    """Whether to pack for config ``data.packing`` = ``setting`` ("auto": where
    :func:`check_packing_exact` passes on ``model``; "on": must pass; "off"), and a note to print."""
    if setting == "off":
        return False, None
    why = check_packing_exact(model)
    if why is None:
        return True, None
    if setting == "on":
        raise ValueError(f"config data.packing = 'on', but {why}; use data.packing = 'auto' or 'off'")
    return False, f"sequence packing off: {why}"
