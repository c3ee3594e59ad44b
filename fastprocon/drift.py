"""Refusal-direction drift: cosine between the initial directions and those of trained checkpoints.

Each checkpoint's directions are re-extracted by the same difference in means over the same
prompts (stored in the initial directions file), and compared layer by layer:
cos_l = r_l(initial) . r_l(checkpoint), sign kept (procon-method.md section 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastprocon.argtypes import positive_int
from fastprocon.data import load_instructions
from fastprocon.directions import DirectionSet, extract_directions, load_directions
from fastprocon.io import check_output, write_json
from fastprocon.models import add_model_args, model_from_args
from fastprocon.plots import line_plot


def direction_cosines(initial: DirectionSet, other: DirectionSet) -> list[float | None]:
    """Per-layer cosine of two direction sets ([L] values; None where either has no direction)."""
    if initial.directions.shape != other.directions.shape:
        raise ValueError(f"direction sets differ in shape: {tuple(initial.directions.shape)} vs "
                         f"{tuple(other.directions.shape)}")
    cos = (initial.directions.double() * other.directions.double()).sum(dim=-1).tolist()
    defined = set(initial.defined_layers) & set(other.defined_layers)
    return [c if l in defined else None for l, c in enumerate(cos)]


def drift_entry(label: str, path: str, ds: DirectionSet, cosines: list[float | None]) -> dict:
    """JSON record of one checkpoint: its cosines and their summary."""
    values = [(c, l) for l, c in enumerate(cosines) if c is not None]
    low, low_layer = min(values)
    return {"label": label, "checkpoint": path, "fingerprint": ds.metadata.get("fingerprint"), "cosine": cosines,
            "mean_cosine": sum(c for c, _ in values) / len(values), "min_cosine": low, "min_layer": low_layer}


def initial_prompts(initial: DirectionSet, harmful: list[str] | None, harmless: list[str] | None,
                    where: str) -> tuple[list[str], list[str]]:
    """The prompts to re-extract with: given ones, else those stored in the initial directions file."""
    harmful = harmful if harmful is not None else initial.metadata.get("harmful_prompts")
    harmless = harmless if harmless is not None else initial.metadata.get("harmless_prompts")
    if not harmful or not harmless:
        raise ValueError(f"{where} stores no prompts: give --harmful and --harmless")
    return harmful, harmless


def checkpoint_labels(checkpoints: list[str], labels: list[str] | None = None) -> list[str]:
    """Legend labels: ``labels`` checked (one per checkpoint, unique), else each checkpoint's
    shortest path suffix that no other checkpoint shares ("runA/model", "runB/model")."""
    if labels is not None:
        if len(labels) != len(checkpoints):
            raise ValueError(f"{len(labels)} --labels for {len(checkpoints)} --checkpoints")
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"--labels must be unique (drift.json and the plot key on them): {repeated} repeated")
        return list(labels)
    parts = [Path(c).parts or (c,) for c in checkpoints]
    depth = [1] * len(checkpoints)
    while True:
        labels = [Path(*p[-k:]).as_posix() for p, k in zip(parts, depth)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1]
        if not clashing:
            return labels
        growable = [i for i in clashing if depth[i] < len(parts[i])]
        if not growable:
            raise ValueError(f"--checkpoints lists {checkpoints[clashing[0]]!r} more than once")
        for i in growable:
            depth[i] += 1


def plot_drift(report: dict, path: str | Path) -> None:
    series = {}
    for entry in report["checkpoints"]:
        points = [(l, c) for l, c in enumerate(entry["cosine"]) if c is not None]
        series[entry["label"]] = ([l for l, _ in points], [c for _, c in points])
    line_plot(path, [{"series": series, "ylabel": "cos(r_initial, r_checkpoint)", "hline": 1.0}],
              title="refusal direction drift")


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
    from fastprocon.train.distributed import tool_processes   # (fastprocon.train imports directions)

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
