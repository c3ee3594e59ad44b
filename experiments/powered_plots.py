"""The powered report's figures: the frontier (ASR and over-refusal against GSM8K test CE), and the
live probe's drift per layer and over training steps."""
from __future__ import annotations

from pathlib import Path

from powered_analysis import pareto_front
from powered_cells import ALIGNED, FAMILIES, cell_names, metric, seed_values
from stats import mean_std


def _canvas(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, FigureCanvasAgg(fig)


def frontier_plot(path: Path, cells: dict, seeds: list[int], variants: list[str], judge: str) -> None:
    """Two panels, ASR and over-refusal against GSM8K test CE: every cell as a small dot; the baselines
    (IFT, IFT_safe at each learning rate) as a thin line through their variant means and their frontier
    (the Pareto front with the aligned model, as the report measures against) as a dashed line; every
    other variant as its mean +- std over seeds."""
    fig, canvas = _canvas((12, 5))
    axes = fig.subplots(1, 2)
    baselines = {b for line in FAMILIES.values() for b in line}
    for ax, m, label in zip(axes, ("asr", "over_refusal"), ("ASR (harmful test)", "over-refusal (harmless test)")):
        for name, line in FAMILIES.items():
            pts = [(mean_std(seed_values(cells, b, seeds, "ce"))[0], mean_std(seed_values(cells, b, seeds, m))[0])
                   for b in line if seed_values(cells, b, seeds, "ce")]   # in learning-rate order: the training path
            if pts:
                drawn_from = ", ".join(b for b in line if seed_values(cells, b, seeds, "ce"))
                (drawn,) = ax.plot(*zip(*pts), "-s", lw=0.8, label=f"{name} by lr: {drawn_from}")
                if ALIGNED in cells:
                    front = pareto_front(pts + [(metric(cells[ALIGNED], "ce"), metric(cells[ALIGNED], m))])
                    ax.plot(*zip(*front), "--", lw=2, color=drawn.get_color(), alpha=0.6,
                            label=f"{name} frontier (Pareto front with aligned)")
                dots = [(metric(cells[c], "ce"), metric(cells[c], m))
                        for b in line for c in cell_names(cells, b, seeds)]
                ax.plot(*zip(*dots), ".", color=drawn.get_color(), alpha=0.4)
        for v in variants:
            if v in baselines or not seed_values(cells, v, seeds, "ce"):
                continue
            ce, y = mean_std(seed_values(cells, v, seeds, "ce")), mean_std(seed_values(cells, v, seeds, m))
            bar = ax.errorbar(ce[0], y[0], xerr=ce[1] or 0, yerr=y[1] or 0, fmt="o", capsize=3,
                              label=f"{v} ({len(seed_values(cells, v, seeds, 'ce'))} seeds)")
            ax.plot(seed_values(cells, v, seeds, "ce"), seed_values(cells, v, seeds, m), ".",
                    color=bar.lines[0].get_color(), alpha=0.4)
        if "aligned" in cells:
            ax.plot(metric(cells["aligned"], "ce"), metric(cells["aligned"], m), "*", color="black", label="aligned")
        ax.set_xlabel("GSM8K test CE")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"frontier ({judge}); dots: cells, markers: variant mean ± std over seeds")
    canvas.print_png(str(path))


def drift_plots(results: Path, cells: dict, variants: list[str], seeds: list[int]) -> None:
    """drift_layers.png (per layer at the last probe) and drift_steps.png (over training), mean over seeds."""
    fig, canvas = _canvas((7, 8))
    axes = fig.subplots(2, 1, sharex=True)
    for v in variants:
        probes = [cells[c]["probes"][-1] for c in cell_names(cells, v, seeds) if cells[c].get("probes")]
        for ax, key in zip(axes, ("probe_drift_cos", "probe_projection_deviation")):
            layers = [i for i, x in enumerate(probes[0][key]) if x is not None] if probes else []
            if layers:
                ax.plot(layers, [sum(p[key][i] for p in probes) / len(probes) for i in layers], label=v)
    _label_pair(axes, "drift cosine vs aligned directions", "layer",
                "per layer at the end of training (last probe), mean over seeds")
    canvas.print_png(str(results / "drift_layers.png"))

    fig, canvas = _canvas((7, 8))
    axes = fig.subplots(2, 1, sharex=True)
    for v in variants:
        series = [cells[c]["probes"] for c in cell_names(cells, v, seeds) if cells[c].get("probes")]
        if not series:
            continue
        steps = [p["step"] for p in series[0]]
        for ax, key in zip(axes, ("probe_drift_cos_mean", "probe_projection_deviation_mean")):
            ax.plot(steps, [sum(s[k][key] for s in series if k < len(s)) / len(series) for k in range(len(steps))],
                    marker="o", label=v)
    _label_pair(axes, "mean drift cosine", "optimizer step", "live probe over training, mean over seeds")
    canvas.print_png(str(results / "drift_steps.png"))


def _label_pair(axes, top_label: str, xlabel: str, title: str) -> None:
    axes[0].set_ylabel(top_label)
    axes[1].set_ylabel("mean |z - z0|")
    axes[1].set_xlabel(xlabel)
    if axes[0].get_legend_handles_labels()[0]:   # cells without probes draw nothing
        axes[0].legend(fontsize=7)
    axes[0].set_title(title)
