"""Reference projections z0: the initial model's r_l . x_l at every response token, recorded once.

ProCon penalises |z_t - z0| at every constrained layer l and response token (Du et al. 2025,
arXiv 2509.06795). :meth:`ReferenceCache.build` runs the initial model forward once over the tokenized
training set (no gradients) and stores z0 from the fused projection (``procon_penalty``'s z);
the training loader calls :meth:`ReferenceCache.gather` to join z0 to each batch.

Files (fastprocon/procon/reference_files.py): an index at the cache path plus one token-major shard
per process of the build (sample i's z0 is one contiguous range of rows [n_i, n_layers]),
memory-mapped on load: :meth:`ReferenceCache.gather` reads and upcasts only the rows of the
micro-batch's samples. The index header says what the cache is valid for: model fingerprint,
directions hash, dataset hash, max length, layers. Under torchrun each rank writes the shard of
samples rank::world; rank 0 then indexes the shards' ids (the cache path must be on a filesystem
every rank sees).
"""
from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fastprocon.data.cache import TokenizedDataset, as_dataset
from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.data.tokenize import TokenizedExample, collate
from fastprocon.distributed.collectives import on_main
from fastprocon.models.fingerprint import FINGERPRINT_VERSION, check_fingerprint_version
from fastprocon.models.load import LoadedModel
from fastprocon.procon.hooks import ProConHooks, stack_recorded
from fastprocon.procon.reference_files import STORAGE_DTYPES, Z0Files, write_index, write_shard
from fastprocon.refusal.directions import DirectionSet, directions_hash


@dataclass
class BuildReport:
    path: str
    bytes: int
    n_samples: int
    n_tokens: int          # response tokens stored (per layer)
    layers: list[int]
    storage_dtype: str
    seconds: float


class ReferenceCache:
    """z0 per sample id, for the layers in ``layers`` (ascending), memory-mapped from the cache
    files; :meth:`gather` reads (and upcasts to fp32) only the rows of the samples it is given."""

    def __init__(self, files: Z0Files):
        self.files, self.header, self.path = files, files.header, str(files.path)
        self.layers: list[int] = list(self.header["layers"])

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, sample_id: str) -> bool:
        return not self.files.locate([sample_id])[2]

    def gather(self, ids: list[str], labels: torch.Tensor) -> torch.Tensor:
        """z0 for a batch: [n_layers, B, T] fp32 on ``labels``' device, 0 where labels == -100.

        ``labels`` [B, T] is the collated batch's (response tokens at the input positions);
        keep it on the CPU (the loader side), or the response counts cost a host sync.
        """
        if labels.dim() != 2 or labels.shape[0] != len(ids):
            raise ValueError(f"gather needs labels [B, T] with B = len(ids) = {len(ids)}, got {tuple(labels.shape)}")
        mask = labels.cpu() != IGNORE_INDEX
        counts = mask.sum(dim=1).tolist()
        shards, rows, missing = self.files.locate(ids)
        if missing:
            raise KeyError(f"sample id {ids[missing[0]]!r} is not in the reference cache {self.path} "
                           f"({len(self)} samples): rebuild it for this data set")
        for sample_id, count, shard, row in zip(ids, counts, shards, rows):
            stored = self.files.count(shard, row)
            if stored != count:
                raise ValueError(f"sample id {sample_id!r} has {count} response tokens in the batch but "
                                 f"{stored} in the reference cache {self.path}")
        out = torch.zeros((len(self.layers), *labels.shape), dtype=torch.float32)
        out[:, mask] = self.files.rows(list(zip(shards.tolist(), rows.tolist()))).T
        return out.to(labels.device)

    def layer_std(self) -> np.ndarray:
        """Standard deviation of z0 over every response token of the cache, per layer: [n_layers]
        float64. Two passes over the memory maps in chunks (mean, then squared deviations), summed
        in float64 by numpy in the index's sample order: the same value on every process and for
        a cache built by any number of processes."""
        n, total = 0, np.zeros(len(self.layers))
        for chunk in self.files.chunks():
            total += chunk.numpy().astype(np.float64).sum(axis=0)
            n += chunk.shape[0]
        if n == 0:
            raise ValueError(f"reference cache {self.path} holds no response token: z0 has no spread")
        mean, squares = total / n, np.zeros(len(self.layers))
        for chunk in self.files.chunks():
            squares += np.square(chunk.numpy().astype(np.float64) - mean).sum(axis=0)
        return np.sqrt(squares / n)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model_fingerprint: str | None, directions_hash: str | None,
             dataset_hash: str | None, max_length: int | None, layers: list[int] | None,
             storage_dtype: str | None = None) -> "ReferenceCache":
        """Open a cache (memory maps) and check it was built for exactly this setup (None skips a
        field's check); ``storage_dtype`` ("fp32" / "bf16"): the dtype the caller asks z0 in.

        Raises FileNotFoundError for a missing index or shard file and ValueError for a corrupt
        file or any mismatch (naming the field, the expected and the found value).
        """
        files = Z0Files(path)
        header = files.header
        # max_length before dataset_hash: a different max_length also changes the hash, and
        # "max_length expected 128, found 100" says what to fix where two hashes would not.
        expected = {"model_fingerprint": model_fingerprint, "directions_hash": directions_hash,
                    "max_length": max_length, "dataset_hash": dataset_hash,
                    "layers": None if layers is None else [int(l) for l in layers]}
        if model_fingerprint is not None:
            check_fingerprint_version(header, f"reference cache {path}", "`fastprocon reference`")
        for name, want in expected.items():
            if want is not None and header.get(name) != want:
                raise ValueError(f"reference cache {path} does not match: {name} expected {want!r}, found "
                                 f"{header.get(name)!r}; rebuild it with `fastprocon reference`")
        stored = header.get("storage_dtype")
        if storage_dtype is not None and stored != storage_dtype:   # bf16 z0 keeps 8 bits: another penalty
            raise ValueError(f"reference cache {path} stores z0 in {stored}, this run asks for {storage_dtype} "
                             f"(procon.reference_dtype); rebuild it with `fastprocon reference --storage-dtype "
                             f"{storage_dtype}`, or set procon.reference_dtype = '{stored}' to use it as it is")
        return cls(files)

    @classmethod
    def build(cls, loaded: LoadedModel, directions: DirectionSet, tokenized: list[TokenizedExample] | TokenizedDataset,
              layers: list[int] | None, max_length: int, path: str | os.PathLike, *, storage_dtype: str = "fp32",
              batch_size: int = 8, progress: bool = True) -> BuildReport:
        """Run the model once over ``tokenized`` and write z0 of every response token to the
        cache at ``path`` (index + shards).

        ``layers`` None = every layer that has a direction. Under an initialised process group,
        each rank handles samples rank::world and writes its own shard; rank 0 then writes the index.
        """
        start = time.perf_counter()
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
        layers = _check_layers(directions, directions.defined_layers if layers is None else layers)
        data = as_dataset(tokenized)
        if not len(data):
            raise ValueError("no samples to record: the tokenized data set is empty")
        too_long = np.flatnonzero(data.lengths > max_length)
        if len(too_long):
            i = int(too_long[0])
            raise ValueError(f"sample {data.id(i)!r}: {data.lengths[i]} tokens; needs <= max_length={max_length}")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        header = {"model": loaded.name, "model_fingerprint": loaded.fingerprint,
                  "fingerprint_version": FINGERPRINT_VERSION, "directions_hash": directions_hash(directions),
                  "dataset_hash": data.hash,
                  "max_length": int(max_length), "layers": layers, "storage_dtype": storage_dtype,
                  "build_id": on_main(lambda: uuid.uuid4().hex),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        indices = np.arange(rank, len(data), world)
        n_batches = _max_over_ranks(math.ceil(len(indices) / batch_size))
        batches = iter_projections(loaded, directions, data, layers, batch_size, indices=indices,
                                   progress=progress and rank == 0, min_batches=n_batches)
        write_shard(path, batches, header, rank, world)
        if world > 1:
            dist.barrier()
        size = on_main(lambda: write_index(path, world))
        return BuildReport(str(path), size, len(data), int(data.n_response.sum()), layers, storage_dtype,
                           time.perf_counter() - start)


def compute_projections(loaded: LoadedModel, directions: DirectionSet, tokenized, layers: list[int],
                        batch_size: int, *, progress: bool = False,
                        min_batches: int = 0) -> tuple[list[str], list[torch.Tensor]]:
    """(ids, z0 [n_layers, n_i] fp32 on CPU per sample) for the response tokens of ``tokenized``
    (a list of TokenizedExample or a TokenizedDataset): :func:`iter_projections` collected."""
    ids, pieces = [], []
    for batch_ids, batch_pieces in iter_projections(loaded, directions, tokenized, layers, batch_size,
                                                    progress=progress, min_batches=min_batches):
        ids.extend(batch_ids)
        pieces.extend(batch_pieces)
    return ids, pieces


@torch.no_grad()
def iter_projections(loaded: LoadedModel, directions: DirectionSet, tokenized, layers: list[int],
                     batch_size: int, *, indices=None, progress: bool = False, min_batches: int = 0):
    """Yield (ids, z0 pieces [n_layers, n_i] fp32 on CPU) per batch for the samples ``indices``
    (default all) of ``tokenized``.

    Batches are formed by length (less padding). ``min_batches`` pads the loop with repeated
    forwards whose output is dropped, so ranks of a sharded (FSDP) model run the same number of
    forwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = as_dataset(tokenized)
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    device = next(model.parameters()).device
    hooks = ProConHooks(model, layers, directions.directions[layers].to(device))   # their recording mode: z
    indices = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)
    order = indices[np.argsort(data.lengths[indices], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with hooks.installed(), tqdm(total=len(order), desc="reference z0", unit="sample", disable=not progress) as bar:
        for step in range(max(len(batches), min_batches)):
            chosen = batches[step] if step < len(batches) else (batches[-1] if batches else None)
            b = collate([data[int(i)] for i in chosen] if chosen is not None else [_DUMMY], pad_id)
            mask = b["attention_mask"]
            position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
            with hooks.recording() as recorded:
                model(input_ids=b["input_ids"].to(device), attention_mask=mask.to(device),
                      position_ids=position_ids.to(device), use_cache=False, logits_to_keep=1)
            if step >= len(batches):
                continue
            response = b["labels"] != IGNORE_INDEX                                     # [B, T] on CPU
            values = stack_recorded(recorded)[:, response.to(device)].float().cpu()   # [n_layers, n_response]
            bar.update(len(chosen))
            yield b["ids"], list(torch.split(values, response.sum(dim=1).tolist(), dim=1))


_DUMMY = TokenizedExample("<no sample on this rank>", [0, 0], [IGNORE_INDEX, 0])


def _max_over_ranks(n: int) -> int:
    if not dist.is_initialized():
        return n
    t = torch.tensor([n], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _check_layers(directions: DirectionSet, layers: list[int]) -> list[int]:
    layers = sorted({int(l) for l in layers})
    if not layers:
        raise ValueError("no layers to constrain")
    undefined = [l for l in layers if l not in set(directions.defined_layers)]
    if layers[0] < 0 or layers[-1] >= directions.num_layers:
        raise ValueError(f"layers {layers} out of range: the directions cover layers 0..{directions.num_layers - 1}")
    if undefined:
        raise ValueError(f"layer(s) {undefined} have no refusal direction (zero mean difference); "
                         f"layers with one: {directions.defined_layers}")
    return layers


def parse_layers(spec: str, directions: DirectionSet) -> list[int]:
    """``"all"`` (every layer with a direction) or a comma list like ``"0,1,5"`` -> sorted layers."""
    if spec.strip() == "all":
        return directions.defined_layers
    try:
        layers = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--layers must be 'all' or comma-separated integers like '1,2,5', got {spec!r}") from None
    return _check_layers(directions, layers)
