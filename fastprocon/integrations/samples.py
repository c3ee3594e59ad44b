"""The samples inside a collated batch, whatever the collator made of them, and their z0.

A batch from Hugging Face / TRL collators is ``input_ids`` [B, T] with ``labels`` [B, T] (-100
on prompt and padding) and either padded rows (``attention_mask`` 0 on padding; right or left)
or packed / padding-free rows (several samples in one row, ``position_ids`` restarting at 0 at
each sample). :func:`sample_segments` finds every sample as (row, start, end); a sample is
then named by its content, the sha1 of its token ids and response mask (:func:`sample_key`), so
z0 recorded once by a pre-pass (:func:`record_reference`) can be found again in any batch,
after any shuffle, padded or packed differently. The z0 store is fastprocon's reference cache
file (procon/reference.py) with these keys as its sample ids.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import uuid
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.models.layers import unwrap_model
from fastprocon.procon.hooks import ProConHooks, stack_recorded
from fastprocon.procon.reference import ReferenceCache
from fastprocon.procon.reference_files import write_index, write_shard

# batch keys passed on to the model when the pre-pass re-runs a batch (flash-attention's
# padding-free keys included); labels are left out, so no loss is computed
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                    "max_length_q", "max_length_k")


@dataclass(frozen=True)
class Segment:
    row: int
    start: int
    end: int          # exclusive


def prepass_kwargs(batch: dict, model: torch.nn.Module) -> dict:
    """The keyword arguments of a forward that only reads hidden states (the z0 pre-pass): the
    model-input part of a collated batch (``MODEL_INPUT_KEYS``; no labels, so no loss), plus
    ``use_cache=False`` (and ``logits_to_keep=1`` where the model takes it: no full logits)."""
    kwargs = {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}
    kwargs["use_cache"] = False
    if "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs




def sample_segments(input_ids: Tensor, attention_mask: Tensor | None = None,
                    position_ids: Tensor | None = None) -> list[Segment]:
    """Every sample of a [B, T] batch as (row, start, end), in row order.

    Positions with ``attention_mask`` 0 are padding. Without ``position_ids`` each row holds one
    sample (its non-padding span); with them a new sample starts wherever they restart at 0.
    Tensors on any device (they are read on the CPU).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    valid = torch.ones(B, T, dtype=torch.bool) if attention_mask is None or attention_mask.dim() != 2 \
        else attention_mask.detach().cpu().bool()
    pos = None if position_ids is None else position_ids.detach().cpu().expand(B, T)
    segments = []
    for row in range(B):
        where = valid[row].nonzero().flatten()
        if where.numel() == 0:
            continue
        starts = where[pos[row, where] == 0].tolist() if pos is not None else []
        if not starts or starts[0] != int(where[0]):
            starts.insert(0, int(where[0]))
        ends = starts[1:] + [int(where[-1]) + 1]
        segments.extend(Segment(row, s, e) for s, e in zip(starts, ends))
    return segments


def sample_key(input_ids: Tensor, response: Tensor) -> str:
    """Content name of one sample: sha1 of its token ids (int64) and response mask, 1-D CPU tensors."""
    digest = hashlib.sha1(input_ids.to(torch.int64).numpy().tobytes())
    digest.update(response.to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batch_samples(batch: dict) -> tuple[list[Segment], list[str], Tensor]:
    """(segments, content keys, response mask [B, T] bool on the CPU) of a collated batch.

    The response mask is ``labels != -100`` (ProCon's tokens, as in ``fastprocon train``) with
    each sample's first token left out: padding-free collators (TRL's) set the label there to
    -100, padded ones need not, and a first token is never a response token of chat data.
    """
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("ProCon needs the batch's labels (-100 on prompt and padding tokens) to find the "
                         "response tokens; this batch has none")
    ids, labels = batch["input_ids"].detach().cpu(), labels.detach().cpu()
    segments = sample_segments(ids, batch.get("attention_mask"), batch.get("position_ids"))
    response = labels != IGNORE_INDEX
    for s in segments:
        response[s.row, s.start] = False
    keys = [sample_key(ids[s.row, s.start:s.end], response[s.row, s.start:s.end]) for s in segments]
    return segments, keys, response


@torch.no_grad()
def record_reference(model: torch.nn.Module, hooks: ProConHooks, batches: Iterable[dict], path: str | os.PathLike,
                     header: dict) -> int:
    """The pre-pass: run ``model`` (the initial weights, eval mode) once over ``batches`` and write
    z0 of every sample's response tokens at the hooks' layers to a reference cache file at
    ``path``, keyed by :func:`sample_key`. Samples seen twice are stored once. Returns the number
    of samples. ``header`` holds the identity fields of procon/reference.py's cache files (and
    ``storage_dtype``, default "fp32")."""
    keys, pieces, seen = [], [], set()
    for batch in batches:
        segments, batch_keys, response = batch_samples(batch)
        with hooks.recording() as recorded:
            model(**prepass_kwargs(batch, model))
        z = stack_recorded(recorded).cpu()                 # [n_layers, B, T]
        for seg, key in zip(segments, batch_keys):
            if key in seen:
                continue
            seen.add(key)
            keys.append(key)
            pieces.append(z[:, seg.row, seg.start:seg.end][:, response[seg.row, seg.start:seg.end]])
    if not keys:
        raise ValueError("the reference pre-pass got no samples: the training data loader is empty")
    write_shard(path, [(keys, pieces)], {"storage_dtype": "fp32", **header, "build_id": uuid.uuid4().hex}, 0, 1)
    write_index(path, 1)
    return len(keys)


def gather_z0(cache: ReferenceCache, batch: dict) -> tuple[Tensor, Tensor]:
    """(z0 [n_layers, B, T] fp32, response mask [B, T] bool) for a collated batch, both on
    ``input_ids``' device; z0 is 0 off the response. A sample not in the cache is a ValueError
    naming it (its row, length and first token ids)."""
    segments, keys, response = batch_samples(batch)
    B, T = response.shape
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if missing:
        s = segments[missing[0]]
        head = batch["input_ids"][s.row, s.start:s.start + 8].tolist()
        raise ValueError(f"no z0 for {len(missing)} sample(s) of this batch in the reference cache {cache.path} "
                         f"(first: row {s.row}, {s.end - s.start} tokens starting {head}): it was recorded on "
                         "other data, or the collator changes samples between epochs (random truncation?); "
                         "record it again on this data")
    width = max((s.end - s.start for s in segments), default=0)
    seg_labels = torch.full((len(segments), width), IGNORE_INDEX, dtype=torch.long)   # cache.gather's mask form
    for i, s in enumerate(segments):
        seg_labels[i, :s.end - s.start].masked_fill_(response[s.row, s.start:s.end], 0)
    pieces = cache.gather(keys, seg_labels)                  # [n_layers, S, width]
    out = torch.zeros((pieces.shape[0], B, T), dtype=torch.float32)
    for i, s in enumerate(segments):
        out[:, s.row, s.start:s.end] = pieces[:, i, :s.end - s.start]
    device = batch["input_ids"].device
    return out.to(device), response.to(device)
