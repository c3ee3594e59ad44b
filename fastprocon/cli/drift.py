"""`fastprocon drift`: per-layer cosine between the initial refusal directions and a checkpoint's."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastprocon.cli.args import add_model_args, model_from_args, positive_int
from fastprocon.data.examples import load_instructions
from fastprocon.distributed.process import tool_processes
from fastprocon.refusal.directions import extract_directions, load_directions
from fastprocon.refusal.drift import checkpoint_labels, direction_cosines, drift_entry, initial_prompts, plot_drift
from fastprocon.utils.io import check_output, write_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "drift", help="per-layer cosine between the initial refusal directions and a checkpoint's",
        description="Re-extract refusal directions on each checkpoint with the same prompts as the initial "
                    "directions file, and write OUT/drift.json and OUT/drift.png (cosine vs layer, one line per "
                    "checkpoint; sign kept).")
    p.add_argument("--directions", required=True, help="the initial model's directions file")
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="trained models: Hugging Face directories (or any spec `--model` takes)")
    p.add_argument("--labels", nargs="+",
                   help="unique legend labels, one per checkpoint (default: the shortest path suffix that tells "
                        "the checkpoints apart, e.g. runA/model)")
    p.add_argument("--harmful", help="harmful instructions (default: the prompts stored in --directions)")
    p.add_argument("--harmless", help="harmless instructions (default: the prompts stored in --directions)")
    add_model_args(p, model=False)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    labels = checkpoint_labels(args.checkpoints, args.labels)
    check_output(args.out, {"--directions": args.directions, "--harmful": args.harmful, "--harmless": args.harmless},
                 files=("drift.json", "drift.png"))
    initial = load_directions(args.directions)
    given = [load_instructions(path) if path else None for path in (args.harmful, args.harmless)]
    harmful, harmless = initial_prompts(initial, *given, where=args.directions)
    entries = []
    with tool_processes(args) as main:   # under torchrun: each checkpoint sharded over the processes
        for label, checkpoint in zip(labels, args.checkpoints):
            loaded = model_from_args(args, checkpoint)
            ds = extract_directions(loaded, harmful, harmless, args.batch_size, progress=main)
            del loaded
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if ds.directions.shape != initial.directions.shape:
                raise ValueError(f"checkpoint {checkpoint} has {ds.num_layers} layers x {ds.hidden_size} but the "
                                 f"directions in {args.directions} are {initial.num_layers} x {initial.hidden_size}")
            entries.append(drift_entry(label, checkpoint, ds, direction_cosines(initial, ds)))
            if main:
                print(f"{label}: mean cosine {entries[-1]['mean_cosine']:.4f}, lowest {entries[-1]['min_cosine']:.4f} "
                      f"at layer {entries[-1]['min_layer']}")
    if not main:
        return 0
    report = {"initial": {"directions": args.directions, "model": initial.metadata.get("model"),
                          "fingerprint": initial.metadata.get("fingerprint")},
              "n_harmful": len(harmful), "n_harmless": len(harmless), "num_layers": initial.num_layers,
              "checkpoints": entries}
    out = Path(args.out)
    write_json(out / "drift.json", report)
    plot_drift(report, out / "drift.png")
    print(f"wrote {out / 'drift.json'} and {out / 'drift.png'}")
    return 0
