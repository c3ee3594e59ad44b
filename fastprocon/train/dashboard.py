"""The run dashboard: one PNG drawn from ``metrics.jsonl`` (``fastprocon report RUN_DIR``).

Four panels: CE and ProCon over steps; the safety probe's refusal scores and harmful refusal
share over steps; its drift heatmap (cosine with the step-0 direction, layer x probe step); its
projection deviation |z - z0| per layer over steps. The trainer draws it at the end of a run
with the probe on (train.safety_probe_every); the report command redraws it any time, also for a
run still in progress. Matplotlib's object API on the Agg canvas, written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

from fastprocon.train.metrics import read_metrics
from fastprocon.train.probe import SHARE_KEY
from fastprocon.train.resume_changes import latest_config_file
from fastprocon.utils.io import atomic_path

DASHBOARD_FILE = "dashboard.png"


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training lines, probe lines) of metrics.jsonl, each sorted by step."""
    train = sorted((r for r in records if "ce" in r), key=lambda r: r["step"])
    probe = sorted((r for r in records if SHARE_KEY in r), key=lambda r: r["step"])
    return train, probe


def _min_share(run_dir: Path) -> float:
    """train.min_refusal_share from the run's newest config version (0 when absent or unreadable)."""
    import tomllib
    try:
        return float(tomllib.loads(latest_config_file(run_dir).read_text())["train"].get("min_refusal_share", 0.0))
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
        return 0.0


def draw_dashboard(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the dashboard of ``run_dir`` to ``out`` (default ``<run dir>/dashboard.png``)."""
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: is it a fastprocon run directory?")
    train, probe = split_records(read_metrics(run_dir))
    if not train and not probe:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no metric lines yet")
    fig = Figure(figsize=(13, 8.5))
    FigureCanvasAgg(fig)
    (ax_loss, ax_refusal), (ax_drift, ax_dev) = fig.subplots(2, 2)

    def empty(ax, title: str) -> None:
        ax.set_title(title)
        ax.text(0.5, 0.5, "no safety probe lines\n(train.safety_probe_every = 0)", ha="center", va="center",
                transform=ax.transAxes, color="gray")

    # CE (left axis) and ProCon (right axis, log scale: it spans orders of magnitude)
    ax_loss.set_title("training loss")
    ax_loss.plot([r["step"] for r in train], [r["ce"] for r in train], marker="o", ms=3, color="C0", label="CE")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("CE per token", color="C0")
    procon = [(r["step"], r["procon"]) for r in train if r.get("procon") is not None]
    if procon:
        twin = ax_loss.twinx()
        twin.plot(*zip(*procon), marker="s", ms=3, color="C3", label="ProCon")
        twin.set_ylabel("ProCon per sample (alpha = 1 units)", color="C3")
        if all(v > 0 for _, v in procon):
            twin.set_yscale("log")
    ax_loss.grid(alpha=0.3)

    if not probe:
        for ax, title in ((ax_refusal, "refusal score"), (ax_drift, "refusal-direction drift"),
                          (ax_dev, "projection deviation")):
            empty(ax, title)
    else:
        steps = [r["step"] for r in probe]
        ax_refusal.set_title("refusal-token log-odds (probe prompts, no generation)")
        ax_refusal.plot(steps, [r["probe_refusal_score_harmful"] for r in probe], marker="o", ms=3,
                        color="C3", label="harmful, mean")
        ax_refusal.plot(steps, [r["probe_refusal_score_harmless"] for r in probe], marker="o", ms=3,
                        color="C2", label="harmless, mean")
        ax_refusal.axhline(0.0, color="gray", ls="--", lw=0.8)
        ax_refusal.set_xlabel("step")
        ax_refusal.set_ylabel("log P(refusal) - log P(other)")
        share = ax_refusal.twinx()
        share.plot(steps, [r[SHARE_KEY] for r in probe], color="black", ls=":", marker="^", ms=3,
                   label="harmful refusal share (first-token log-odds > 0;\n"
                         "not eval-refusal's rate, which reads generated text)")
        threshold = _min_share(run_dir)
        if threshold > 0:
            share.axhline(threshold, color="black", ls="--", lw=0.8, label="min_refusal_share")
        share.set_ylim(-0.03, 1.03)
        share.set_ylabel("share of harmful prompts with score > 0")
        lines = ax_refusal.get_legend_handles_labels()
        more = share.get_legend_handles_labels()
        ax_refusal.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower left")
        ax_refusal.grid(alpha=0.3)

        cos = np.array([[np.nan if c is None else c for c in r["probe_drift_cos"]] for r in probe], dtype=float).T
        image = ax_drift.imshow(np.ma.masked_invalid(cos), aspect="auto", origin="lower", cmap="viridis",
                                interpolation="nearest")
        ax_drift.set_title("drift: cos(r_step0, r_step) per layer")
        ax_drift.set_xlabel("step")
        ax_drift.set_ylabel("layer")
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 9)).round().astype(int)
        ax_drift.set_xticks(ticks, [str(steps[i]) for i in ticks])
        fig.colorbar(image, ax=ax_drift, label="cosine")

        dev = np.array([[np.nan if v is None else v for v in r["probe_projection_deviation"]] for r in probe],
                       dtype=float)
        layers = [l for l in range(dev.shape[1]) if not np.isnan(dev[:, l]).all()]
        cmap = matplotlib.colormaps["viridis"]
        for k, l in enumerate(layers):
            ax_dev.plot(steps, dev[:, l], color=cmap(k / max(len(layers) - 1, 1)), lw=1)
        ax_dev.plot(steps, [r["probe_projection_deviation_mean"] for r in probe], color="black", lw=2,
                    label="mean over layers")
        ax_dev.set_title("projection deviation mean |z - z0| per layer (training slice)")
        ax_dev.set_xlabel("step")
        ax_dev.set_ylabel("|z - z0| per response token")
        ax_dev.legend(fontsize=8, loc="upper left")
        ax_dev.grid(alpha=0.3)
        if layers:
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize
            fig.colorbar(ScalarMappable(Normalize(layers[0], layers[-1]), cmap), ax=ax_dev, label="layer")
    ax_drift.yaxis.set_major_locator(MaxNLocator(integer=True))   # layers and steps are integers
    for ax in (ax_loss, ax_refusal, ax_dev):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"fastprocon run {run_dir.name}")
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / DASHBOARD_FILE
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
