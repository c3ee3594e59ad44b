"""Reference projections z0: the initial model's r_l . x_l at every response token, recorded once.

ProCon penalises |z_t - z0| at every constrained layer l and response token (procon-method.md
section 3). :meth:`ReferenceCache.build` runs the initial model forward once over the tokenized
training set (no gradients) and stores z0 from the fused projection (``procon_penalty``'s z);
the training loader calls :meth:`ReferenceCache.gather` to join z0 to each batch.

File layout (safetensors): ``z0`` [n_layers, n_tokens] (fp32 or bf16) holding every sample's
response-token projections back to back, ``offsets`` [n_samples + 1] int64 delimiting them, and a
JSON header with the sample ids (in the same order) and what the cache is valid for: model
fingerprint, directions hash, dataset hash, max length, layers. Under torchrun each rank builds
the part for samples rank::world, and rank 0 merges the parts into one file (the output path
must be on a filesystem every rank sees).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fastprocon.argtypes import int_at_least, positive_int
from fastprocon.data import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    dataset_hash,
    load_examples_report,
    resolve_data_path,
    tokenize_examples,
)
from fastprocon.directions import DirectionSet, directions_hash, load_directions_for
from fastprocon.io import check_output, read_safetensors, save_safetensors
from fastprocon.models import (FINGERPRINT_VERSION, LoadedModel, add_model_args, check_fingerprint_version,
                               model_from_args)
from fastprocon.penalty import procon_penalty
from fastprocon.steering import on_layer_inputs

FORMAT = "fastprocon.reference"
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What a cache is valid for: load() compares each with what the caller expects.
IDENTITY_FIELDS = ("model_fingerprint", "directions_hash", "dataset_hash", "max_length", "layers")


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
    """z0 per sample id, for the layers in ``layers`` (ascending), upcast to fp32 in memory."""

    def __init__(self, z0: torch.Tensor, offsets: torch.Tensor, ids: list[str], header: dict, path: str = "<memory>"):
        self.header, self.path = header, path
        self.layers: list[int] = list(header["layers"])
        counts = (offsets[1:] - offsets[:-1]).tolist()
        # one fp32 [n_layers, n_i] view per sample, so gather only concatenates
        self._pieces = torch.split(z0.float(), counts, dim=1)
        self._index = {sample_id: i for i, sample_id in enumerate(ids)}

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._index

    def gather(self, ids: list[str], labels: torch.Tensor) -> torch.Tensor:
        """z0 for a batch: [n_layers, B, T] fp32 on ``labels``' device, 0 where labels == -100.

        ``labels`` [B, T] is the collated batch's (response tokens at the input positions);
        keep it on the CPU (the loader side), or the response counts cost a host sync.
        """
        if labels.dim() != 2 or labels.shape[0] != len(ids):
            raise ValueError(f"gather needs labels [B, T] with B = len(ids) = {len(ids)}, got {tuple(labels.shape)}")
        mask = labels != IGNORE_INDEX
        counts = mask.sum(dim=1).tolist()
        pieces = []
        for sample_id, count in zip(ids, counts):
            i = self._index.get(sample_id)
            if i is None:
                raise KeyError(f"sample id {sample_id!r} is not in the reference cache {self.path} "
                               f"({len(self)} samples): rebuild it for this data set")
            if self._pieces[i].shape[1] != count:
                raise ValueError(f"sample id {sample_id!r} has {count} response tokens in the batch but "
                                 f"{self._pieces[i].shape[1]} in the reference cache {self.path}")
            pieces.append(self._pieces[i])
        out = torch.zeros((len(self.layers), *labels.shape), dtype=torch.float32)
        out[:, mask.cpu()] = torch.cat(pieces, dim=1)
        return out.to(labels.device)

    # -----------------------------------------------------------------------------------------
    # Files
    # -----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, *, model_fingerprint: str | None, directions_hash: str | None,
             dataset_hash: str | None, max_length: int | None, layers: list[int] | None) -> "ReferenceCache":
        """Read a cache and check it was built for exactly this setup (None skips a field's check).

        Raises FileNotFoundError for a missing file and ValueError for a corrupt file or any
        mismatch (naming the field, the expected and the found value).
        """
        z0, offsets, ids, header = read_cache_file(path)
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
        return cls(z0, offsets, ids, header, str(path))

    @classmethod
    def build(cls, loaded: LoadedModel, directions: DirectionSet, tokenized: list[TokenizedExample],
              layers: list[int] | None, max_length: int, path: str | os.PathLike, *, storage_dtype: str = "fp32",
              batch_size: int = 8, progress: bool = True) -> BuildReport:
        """Run the model once over ``tokenized`` and write z0 of every response token to ``path``.

        ``layers`` None = every layer that has a direction. Under an initialised process group,
        each rank handles samples rank::world and rank 0 writes the merged file.
        """
        start = time.perf_counter()
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
        layers = _check_layers(directions, directions.defined_layers if layers is None else layers)
        if not tokenized:
            raise ValueError("no samples to record: the tokenized data set is empty")
        for ex in tokenized:
            if len(ex.input_ids) > max_length or len(ex.labels) != len(ex.input_ids):
                raise ValueError(f"sample {ex.id!r}: {len(ex.input_ids)} tokens, {len(ex.labels)} labels; "
                                 f"needs equal lengths <= max_length={max_length}")
        header = {"model": loaded.name, "model_fingerprint": loaded.fingerprint, "fingerprint_version": FINGERPRINT_VERSION,
                  "directions_hash": directions_hash(directions), "dataset_hash": dataset_hash(tokenized),
                  "max_length": int(max_length), "layers": layers, "storage_dtype": storage_dtype,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        shard = tokenized[rank::world]
        n_batches = _max_over_ranks(math.ceil(len(shard) / batch_size))
        ids, pieces = compute_projections(loaded, directions, shard, layers, batch_size,
                                          progress=progress and rank == 0, min_batches=n_batches)
        path = Path(path)
        if world == 1:
            size = write_cache_file(path, ids, pieces, header, storage_dtype)
        else:
            part = part_path(path, rank, world)
            write_cache_file(part, ids, pieces, header, storage_dtype)
            dist.barrier()
            if rank == 0:
                merge_parts([part_path(path, r, world) for r in range(world)], path)
            dist.barrier()
            size = path.stat().st_size
        n_tokens = sum(len(ex.labels) - ex.labels.count(IGNORE_INDEX) for ex in tokenized)
        return BuildReport(str(path), size, len(tokenized), n_tokens, layers, storage_dtype,
                           time.perf_counter() - start)


@torch.no_grad()
def compute_projections(loaded: LoadedModel, directions: DirectionSet, tokenized: list[TokenizedExample],
                        layers: list[int], batch_size: int, *, progress: bool = False,
                        min_batches: int = 0) -> tuple[list[str], list[torch.Tensor]]:
    """(ids, z0 [n_layers, n_i] fp32 on CPU per sample) for the response tokens of ``tokenized``.

    Batches are formed by length (less padding). ``min_batches`` pads the loop with repeated
    forwards whose output is dropped, so ranks of a sharded (FSDP) model run the same number of
    forwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    device = next(model.parameters()).device
    r = directions.directions.to(device)
    position = {l: k for k, l in enumerate(layers)}
    z_layers: list[torch.Tensor | None] = [None] * len(layers)

    def project(l: int, x: torch.Tensor) -> None:
        _, z_layers[position[l]] = procon_penalty(x, r[l], return_projection=True, validate=False)

    order = sorted(tokenized, key=lambda ex: len(ex.input_ids))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    ids, pieces = [], []
    with on_layer_inputs(model, project, layers), tqdm(total=len(order), desc="reference z0", unit="sample",
                                                      disable=not progress) as bar:
        for step in range(max(len(batches), min_batches)):
            batch = batches[step] if step < len(batches) else (batches[-1] if batches else [_DUMMY])
            b = collate(batch, pad_id)
            mask = b["attention_mask"]
            position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
            model(input_ids=b["input_ids"].to(device), attention_mask=mask.to(device),
                  position_ids=position_ids.to(device), use_cache=False, logits_to_keep=1)
            if step >= len(batches):
                continue
            response = b["labels"] != IGNORE_INDEX                     # [B, T] on CPU
            values = torch.stack(z_layers)[:, response.to(device)].cpu()   # [n_layers, n_response]
            ids.extend(b["ids"])
            pieces.extend(torch.split(values, response.sum(dim=1).tolist(), dim=1))
            bar.update(len(batch))
    return ids, pieces


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


# ---------------------------------------------------------------------------------------------
# Cache files and per-rank parts
# ---------------------------------------------------------------------------------------------

def part_path(path: Path, rank: int, world: int) -> Path:
    return path.with_name(f"{path.name}.part{rank}-of-{world}")


def write_cache_file(path: str | os.PathLike, ids: list[str], pieces: list[torch.Tensor], header: dict,
                     storage_dtype: str) -> int:
    """Write per-sample z0 pieces ([n_layers, n_i] each, in ``ids`` order); returns the bytes written."""
    if len(ids) != len(pieces):
        raise ValueError(f"{len(ids)} ids but {len(pieces)} z0 pieces")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate sample ids in the reference cache")
    n_layers = len(header["layers"])
    counts = torch.tensor([p.shape[1] for p in pieces], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    z0 = torch.cat(pieces, dim=1) if pieces else torch.zeros(n_layers, 0)
    header = {**header, "storage_dtype": storage_dtype, "n_samples": len(ids), "n_tokens": int(offsets[-1]),
              "ids": list(ids)}
    return save_safetensors(path, {"z0": z0.to(STORAGE_DTYPES[storage_dtype]), "offsets": offsets}, FORMAT, header)


def read_cache_file(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(z0 [n_layers, n_tokens], offsets [n + 1], ids, header) with the layout checked."""
    tensors, header = read_safetensors(path, FORMAT)
    z0, offsets, ids = tensors.get("z0"), tensors.get("offsets"), header.get("ids")
    missing = [name for name in IDENTITY_FIELDS if name not in header]
    if z0 is None or offsets is None or not isinstance(ids, list) or missing:
        raise ValueError(f"{path}: corrupt reference cache (needs tensors z0, offsets and header fields ids, "
                         f"{', '.join(IDENTITY_FIELDS)}; missing {missing or 'a tensor or the ids'})")
    if (z0.dim() != 2 or z0.shape[0] != len(header["layers"]) or offsets.shape != (len(ids) + 1,)
            or offsets[0] != 0 or offsets[-1] != z0.shape[1] or (offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{path}: corrupt reference cache: z0 {tuple(z0.shape)}, offsets {tuple(offsets.shape)}, "
                         f"{len(ids)} ids, {len(header['layers'])} layers do not fit together")
    return z0, offsets, ids, header


def merge_parts(parts: list[str | os.PathLike], path: str | os.PathLike) -> int:
    """Merge per-rank cache parts into one cache file at ``path``, then delete the parts.

    The parts must agree on every identity field; a sample id in two parts is an error.
    Returns the bytes written.
    """
    loaded = [read_cache_file(p) for p in parts]
    first = loaded[0][3]
    for p, (_, _, _, header) in zip(parts, loaded):
        for name in (*IDENTITY_FIELDS, "storage_dtype"):
            if header[name] != first[name]:
                raise ValueError(f"cannot merge {p}: {name} is {header[name]!r}, part {parts[0]} has {first[name]!r}")
    ids = [sample_id for _, _, part_ids, _ in loaded for sample_id in part_ids]
    pieces = [piece for z0, offsets, _, _ in loaded
              for piece in torch.split(z0, (offsets[1:] - offsets[:-1]).tolist(), dim=1)]
    header = {k: v for k, v in first.items() if k not in ("ids", "n_samples", "n_tokens")}
    size = write_cache_file(path, ids, pieces, header, first["storage_dtype"])
    for p in parts:
        os.unlink(p)
    return size


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "reference", help="record the initial model's projections z0 on the training data",
        description="Run the initial model once over a training set and store, for every response token and "
                    "every constrained layer, its projection on the refusal direction (z0 of the ProCon loss). "
                    "Under torchrun each rank processes a share and rank 0 writes one merged file.")
    add_model_args(p)
    p.add_argument("--directions", required=True, help="directions file from `fastprocon directions` for this model")
    p.add_argument("--data", required=True, help="training data (JSON/JSONL) or a built-in set name, e.g. 'benign'")
    p.add_argument("--max-length", type=int_at_least(2), required=True, help="max tokens per sample (as in training)")
    p.add_argument("--layers", default="all", help="'all' (every layer with a direction, default) or e.g. '1,2,5'")
    p.add_argument("--storage-dtype", choices=sorted(STORAGE_DTYPES), default="fp32")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed data rows (reports the count)")
    p.add_argument("--drop-overlong-prompts", action="store_true",
                   help="drop examples whose prompt alone fills --max-length (as the trainer's "
                        "data.drop_overlong_prompts; otherwise they are an error)")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a training run's reference cache (--out is an existing file in a run directory)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data_path = resolve_data_path(args.data)
    check_output(args.out, {"--model": args.model, "--directions": args.directions, "--data": data_path},
                 force=args.force)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if distributed:
        cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            args.device = f"cuda:{torch.cuda.current_device()}"
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        loaded = model_from_args(args)
        directions = load_directions_for(loaded, args.directions)
        data = load_examples_report(data_path, skip_bad_rows=args.skip_bad_rows)
        if data.skipped:
            print(f"skipped {len(data.skipped)} of {data.n_rows} bad rows (first: {data.skipped[0]})")
        tokenized, n_truncated = tokenize_examples(data.examples, loaded.tokenizer, args.max_length,
                                                   drop_overlong_prompts=args.drop_overlong_prompts)
        if not tokenized:   # an empty cache would only fail later, in training
            raise ValueError(f"all {len(data.examples)} examples of {data_path} were dropped by "
                             f"--drop-overlong-prompts: every prompt fills --max-length={args.max_length} tokens; "
                             "raise --max-length")
        report = ReferenceCache.build(loaded, directions, tokenized, parse_layers(args.layers, directions),
                                      args.max_length, args.out, storage_dtype=args.storage_dtype,
                                      batch_size=args.batch_size)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"wrote {report.path}: {report.bytes / 2**20:.2f} MiB, {report.n_samples} samples "
                  f"({n_truncated} truncated to {args.max_length} tokens), {report.n_tokens} response tokens x "
                  f"{len(report.layers)} layers, {report.storage_dtype}, in {report.seconds:.1f} s")
    finally:
        if distributed:
            dist.barrier()
            dist.destroy_process_group()
    return 0
