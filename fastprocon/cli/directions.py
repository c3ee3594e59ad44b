"""`fastprocon directions`: refusal directions of a model and their held-out separation."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastprocon.cli.args import add_model_args, model_from_args, non_negative_int, positive_int
from fastprocon.data.prompts import read_prompts
from fastprocon.distributed.process import tool_processes
from fastprocon.models.load import LoadedModel
from fastprocon.refusal.directions import (
    DirectionSet,
    extract_directions,
    plot_separation,
    save_directions,
    separation_report,
)
from fastprocon.utils.io import check_output, write_json

# ---------------------------------------------------------------------------------------------
# Command line (model options: models.add_model_args; prompt sets: prompts.read_prompts)
# ---------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "directions", help="extract refusal directions (difference in means) and report their quality",
        description="Extract one refusal direction per decoder layer: normalize(mean over harmful prompts - "
                    "mean over harmless prompts) of the layer input at the last token of the chat-formatted "
                    "prompt. Writes OUT/directions.safetensors and, on a held-out split, OUT/quality.json and "
                    "OUT/quality.png (per-layer AUROC and Cohen's d of harmful vs harmless projections).")
    add_model_args(p)
    p.add_argument("--harmful", help="harmful instructions, JSON/JSONL (default: the built-in set)")
    p.add_argument("--harmless", help="harmless instructions, JSON/JSONL (default: the built-in set)")
    p.add_argument("--harmful-val", help="held-out harmful instructions (default: the built-in eval set)")
    p.add_argument("--harmless-val", help="held-out harmless instructions (default: the built-in eval set)")
    p.add_argument("--max-prompts", type=non_negative_int, default=128,
                   help="use a seeded random subset of this many prompts per training set (default 128 as in "
                        "Arditi et al.; 0 = all)")
    p.add_argument("--max-val-prompts", type=non_negative_int, default=0,
                   help="same for the held-out sets (default 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--no-quality", action="store_true", help="skip the held-out separation report")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true",
                   help="overwrite the directions of a training run (--out is a run directory that has them)")
    p.set_defaults(func=run)


QUALITY_FILES = ("quality.json", "quality.png")


def run(args: argparse.Namespace) -> int:
    check_output(args.out, {"--model": args.model, "--harmful": args.harmful, "--harmless": args.harmless,
                            "--harmful-val": args.harmful_val, "--harmless-val": args.harmless_val},
                 files=("directions.safetensors", *QUALITY_FILES), force=args.force)
    harmful, harmful_src = read_prompts(args.harmful, "harmful", args.max_prompts, args.seed)
    harmless, harmless_src = read_prompts(args.harmless, "harmless", args.max_prompts, args.seed)
    with tool_processes(args) as main:   # under torchrun: a sharded model, every rank runs every prompt
        loaded = model_from_args(args)
        ds = extract_directions(loaded, harmful, harmless, args.batch_size,
                                sources={"harmful": harmful_src, "harmless": harmless_src}, progress=main)
        out = Path(args.out)
        path = out / "directions.safetensors"
        if main:
            for stale in QUALITY_FILES:   # an earlier run's report must not pass for these directions
                (out / stale).unlink(missing_ok=True)
            size = save_directions(ds, path)
            print(f"wrote {path} ({ds.num_layers} layers x {ds.hidden_size}, {size / 1024:.1f} KiB) from "
                  f"{len(harmful)} harmful + {len(harmless)} harmless prompts")
        if not args.no_quality:
            _quality(args, ds, loaded, harmful, harmless, path, main)
        del loaded
    return 0


def _quality(args: argparse.Namespace, ds: DirectionSet, loaded: LoadedModel, harmful: list[str],
             harmless: list[str], path: Path, main: bool) -> None:
    harmful_val, harmful_val_src = read_prompts(args.harmful_val, "harmful_eval", args.max_val_prompts, args.seed)
    harmless_val, harmless_val_src = read_prompts(args.harmless_val, "harmless_eval", args.max_val_prompts, args.seed)
    overlap = len(set(harmful_val) & set(harmful)) + len(set(harmless_val) & set(harmless))
    if overlap and main:
        print(f"warning: {overlap} held-out prompts also appear in the training prompts")
    report = separation_report(ds, loaded, harmful_val, harmless_val, args.batch_size, progress=main)
    if not main:
        return
    out = Path(args.out)
    report = {"model": loaded.name, "fingerprint": loaded.fingerprint, "directions": str(path),
              "train": {"harmful": ds.metadata["sources"]["harmful"], "harmless": ds.metadata["sources"]["harmless"]},
              "val": {"harmful": harmful_val_src, "harmless": harmless_val_src},
              "val_train_overlap": overlap, **report}
    write_json(out / "quality.json", report)
    plot_separation(report, out / "quality.png", f"refusal direction separation: {Path(loaded.name).name}")
    print(f"best layer {report['best_layer']}: AUROC {report['best_auroc']:.3f}, Cohen's d "
          f"{report['best_cohens_d']:.2f} on {len(harmful_val)} harmful + {len(harmless_val)} harmless held-out "
          f"prompts; wrote {out / 'quality.json'} and {out / 'quality.png'}")
