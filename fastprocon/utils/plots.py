"""Report files: JSON and line plots (PNG), each written atomically (see :func:`atomic_path`).

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global state, no display).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from fastprocon.utils.io import atomic_path


def line_plot(path: str | os.PathLike, panels: Sequence[Mapping], *, title: str | None = None,
              xlabel: str = "layer") -> Path:
    """Save a PNG with one panel per entry of ``panels``, stacked vertically, sharing the x axis.

    Each panel is a mapping with ``series`` ({label: (x values, y values)}), ``ylabel``, and
    optionally ``hline`` (a reference level drawn dashed, e.g. chance AUROC 0.5) and ``ylim``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not panels:
        raise ValueError("line_plot needs at least one panel")
    fig = Figure(figsize=(7, 2.8 * len(panels) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        series = panel["series"]
        for label, (xs, ys) in series.items():
            ax.plot(list(xs), list(ys), marker="o", markersize=3, linewidth=1.4, label=label)
        if panel.get("hline") is not None:
            ax.axhline(panel["hline"], color="gray", linestyle="--", linewidth=0.8)
        if panel.get("ylim") is not None:
            ax.set_ylim(*panel["ylim"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel(xlabel)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


