"""`fastprocon reference`: record the initial model's projections z0 on the training data."""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from fastprocon.cli.args import add_model_args, int_at_least, model_from_args, positive_int
from fastprocon.data.cache import load_training_set
from fastprocon.data.examples import resolve_data_path
from fastprocon.procon.reference import ReferenceCache, parse_layers
from fastprocon.procon.reference_files import STORAGE_DTYPES
from fastprocon.refusal.directions import load_directions_for
from fastprocon.utils.io import check_output

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "reference", help="record the initial model's projections z0 on the training data",
        description="Run the initial model once over a training set and store, for every response token and "
                    "every constrained layer, its projection on the refusal direction (z0 of the ProCon loss). "
                    "Under torchrun each rank processes a share and writes its own shard; rank 0 writes the index.")
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
        tokenized = load_training_set(data_path, loaded.tokenizer, args.max_length, skip_bad_rows=args.skip_bad_rows,
                                      drop_overlong_prompts=args.drop_overlong_prompts)
        info, n_truncated = tokenized.info, tokenized.info["n_truncated"]
        if info["n_skipped"]:
            print(f"skipped {info['n_skipped']} of {info['n_rows']} bad rows (first: {info['first_skipped']})")
        if not len(tokenized):   # an empty cache would only fail later, in training
            raise ValueError(f"all {info['n_examples']} examples of {data_path} were dropped by "
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
