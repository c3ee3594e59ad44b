"""Arguments shared by the subcommands: argparse value types (a bad value is a usage error that
names the option, exit status 2, before any work is done) and the model options."""
from __future__ import annotations

import argparse
import math

import torch

from fastprocon.distributed.sharding import shard_for_inference
from fastprocon.models.load import DTYPES, LoadedModel, load_model, resolve_device


def int_at_least(low: int):
    """argparse ``type=``: an integer >= ``low`` (a bad value is a usage error naming the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_float(text: str) -> float:
    """argparse ``type=``: a finite float (nan and inf are usage errors)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def add_model_args(parser: argparse.ArgumentParser, *, model: bool = True) -> None:
    """--model (unless ``model`` is False), --dtype, --device."""
    if model:
        parser.add_argument("--model", default="smollm2", help=(
            "model spec: 'smollm2' (built-in SmolLM2-135M-Instruct, default), 'tiny', a Hugging Face "
            "directory, a cached hub id or a .gguf file"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (default fp32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available; default)")



def model_from_args(args: argparse.Namespace, spec: str | None = None) -> LoadedModel:
    """Load ``spec`` (default ``args.model``) with the dtype and device of ``args``; under a
    process group of several processes (a tool under torchrun) FSDP2-sharded, so each process
    holds 1/world of the weights (its forwards are then collective: every rank runs the same ones)."""
    sharded = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return load_model(spec or args.model, dtype=DTYPES[args.dtype], device=resolve_device(args.device),
                      wrap=shard_for_inference if sharded else None)
