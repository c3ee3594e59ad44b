"""Refusal-direction drift: cosine between the initial directions and those of trained checkpoints.

Each checkpoint's directions are re-extracted by the same difference in means over the same
prompts (stored in the initial directions file), and compared layer by layer:
cos_l = r_l(initial) . r_l(checkpoint), sign kept (Du et al. 2025, arXiv 2509.06795).
"""
from __future__ import annotations

from pathlib import Path

from fastprocon.refusal.directions import DirectionSet
from fastprocon.utils.plots import line_plot


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
