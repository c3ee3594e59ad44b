"""Draw the benchmark figures and write the markdown performance report, from the CSVs only.

For every ``penalty_<tag>.csv`` and ``train_<tag>.csv`` in the results directory (tag = "cpu"
or the card's name) this writes ``penalty_<tag>.png`` and ``train_<tag>.png`` next to them,
and one ``README_perf.md`` with the tables, the machine and versions, the command that
produced each CSV, and any hand-written ``notes_<tag>.md`` (conditions of the run).

    python benchmarks/report.py                       # benchmarks/results/
    python benchmarks/report.py --results $OUT
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import harness
from bench_ops import FIELDS as OPS_FIELDS
from bench_penalty import FIELDS as PENALTY_FIELDS
from bench_train import FIELDS as TRAIN_FIELDS
from host_time import FIELDS as HOST_FIELDS

from fastprocon.utils.io import atomic_path

PROVIDER_STYLE = {  # provider -> (color, linestyle)
    "reference": ("tab:gray", "-"), "compiled": ("tab:orange", "-"), "fastprocon": ("tab:blue", "-"),
    "injection-reference": ("tab:purple", "--"), "injection": ("tab:green", "--"),
}
BASELINE = {"reference": "reference", "compiled": "reference", "fastprocon": "reference",
            "injection-reference": "injection-reference", "injection": "injection-reference"}


def shape_label(n: int, d: int) -> str:
    return f"{n // 1024}k x {d}" if n % 1024 == 0 else f"{n} x {d}"


def _figure(n_rows: int, n_cols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * n_cols, height * n_rows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(n_rows, n_cols, squeeze=False)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def plot_penalty(rows: list[dict], path: Path) -> Path:
    """Full mode, one column per dtype: speedup over the eager reference of the same form,
    fraction of copy bandwidth, and extra bytes per token, against the shape. Masked rows when
    both settings were measured (half the tokens weighted: the training case)."""
    if any(r["masked"] == "True" for r in rows):
        rows = [r for r in rows if r["masked"] == "True"]
    full = [r for r in rows if r["mode"] == "full"]
    dtypes = sorted({r["dtype"] for r in full})
    fig, axes = _figure(3, len(dtypes), 6.0, 3.2)
    for col, dtype in enumerate(dtypes):
        sel = [r for r in full if r["dtype"] == dtype]
        shapes = sorted({(int(r["N"]), int(r["D"])) for r in sel}, key=lambda s: (s[0] * s[1], s))
        by = {(r["provider"], int(r["N"]), int(r["D"])): r for r in sel}
        xs = list(range(len(shapes)))
        for provider, (color, style) in PROVIDER_STYLE.items():
            pts = [(x, by.get((provider, *s)), by.get((BASELINE[provider], *s))) for x, s in zip(xs, shapes)]
            pts = [(x, r, b) for x, r, b in pts if r is not None]
            if not pts:
                continue
            kw = dict(color=color, linestyle=style, marker="o", markersize=3, label=provider)
            speed = [(x, float(b["median_ms"]) / float(r["median_ms"])) for x, r, b in pts if b is not None]
            if speed:
                axes[0, col].plot(*zip(*speed), **kw)
            axes[1, col].plot([x for x, _, _ in pts], [100 * float(r["frac_of_copy"]) for _, r, _ in pts], **kw)
            mem = [(x, int(r["extra_mem_bytes"]) / int(r["N"])) for x, r, _ in pts
                   if r["extra_mem_bytes"] != ""]
            if mem:
                axes[2, col].plot(*zip(*mem), **kw)
        axes[0, col].set_title(f"{dtype}, forward + backward ({sel[0]['device']})", fontsize=9)
        axes[0, col].set_ylabel("speedup over eager reference")
        axes[0, col].axhline(1.0, color="black", linewidth=0.6)
        axes[1, col].set_ylabel("% of copy bandwidth")
        axes[2, col].set_ylabel("extra bytes / token")
        axes[2, col].set_yscale("symlog", linthresh=1.0)     # linear near 0: fused paths may need none
        for ax in axes[:, col]:
            ax.set_xticks(xs)
            ax.set_xticklabels([shape_label(*s) for s in shapes], rotation=45, ha="right", fontsize=7)
            ax.grid(alpha=0.3)
        axes[2, col].set_xlabel("tokens N x hidden D")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def plot_train(rows: list[dict], path: Path) -> Path:
    """Step time (median, p20-p80 bars) and peak memory per model and ProCon variant."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = _figure(1, 2, 6.0, 3.6)
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        sel = {r["model"]: r for r in rows if r["variant"] == v}
        xs = [m + (i - (len(variants) - 1) / 2) * width for m in range(len(models))]
        per_model = [sel.get(m) for m in models]
        med = [float(r["median_ms"]) if r else 0.0 for r in per_model]
        err = [[m - float(r["p20_ms"]) if r else 0 for m, r in zip(med, per_model)],
               [float(r["p80_ms"]) - m if r else 0 for m, r in zip(med, per_model)]]
        bars = axes[0, 0].bar(xs, med, width, yerr=err, capsize=2, label=v)
        for bar, r in zip(bars, per_model):
            if r and r["step_overhead"] != "" and v != "off":     # above the p80 whisker
                axes[0, 0].annotate(f"{100 * float(r['step_overhead']):+.1f}%", (bar.get_x() + bar.get_width() / 2,
                                    float(r["p80_ms"])), ha="center", va="bottom", fontsize=7)
        axes[0, 1].bar(xs, [int(r["peak_mem_bytes"]) / 2**30 if r else 0 for r in per_model], width, label=v)
    for ax, label in ((axes[0, 0], "step time (ms)"), (axes[0, 1], "peak memory (GiB)")):
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.12)
    axes[0, 1].legend(fontsize=7, loc="lower right")
    first = rows[0]
    axes[0, 0].set_title(f"ProCon at every layer: train step ({first['device']}, {first['dtype']}, "
                         f"{first['batch']} x {first['seq']} tokens)", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# markdown


def _env_lines(rows: list[dict]) -> list[str]:
    r = rows[0]
    return [f"- machine: {r['machine']}; device: {r['device']}",
            f"- torch {r['torch']}, triton {r['triton']}, transformers {r['transformers']}",
            f"- command: `{r['command']}`"]


def _ms(r: dict | None) -> str:
    return f"{float(r['median_ms']):.3f}" if r else "-"


def _mem(r: dict | None) -> str:
    return harness.fmt_bytes(int(r["extra_mem_bytes"])) if r and r["extra_mem_bytes"] != "" else "-"


def _ratio(num: dict | None, den: dict | None, key: str = "median_ms") -> str:
    return f"{float(num[key]) / float(den[key]):.2f}x" if num and den and float(den[key]) else "-"


def penalty_table(rows: list[dict]) -> list[str]:
    """Forward + backward, every shape: both forms, with speedups and extra memory."""
    by = {(r["provider"], r["dtype"], r["masked"], r["N"], r["D"]): r for r in rows if r["mode"] == "full"}
    keys = sorted({k[1:] for k in by}, key=lambda k: (k[0], k[1] != "True", int(k[2]) * int(k[3]), int(k[2])))
    out = ["| dtype | masked | N | D | reference ms | compiled ms | fastprocon ms | vs ref | vs compiled "
           "| extra mem ref / fused | injection-ref ms | injection ms | vs ref | extra mem ref / fused "
           "| injection % of copy |",
           "|" + "---|" * 15]
    for k in keys:
        g = {p: by.get((p, *k)) for p in PROVIDER_STYLE}
        inj = g["injection"]
        copy_pct = f"{100 * float(inj['frac_of_copy']):.0f}%" if inj else "-"
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {_ms(g['reference'])} | {_ms(g['compiled'])} | "
                   f"{_ms(g['fastprocon'])} | {_ratio(g['reference'], g['fastprocon'])} | "
                   f"{_ratio(g['compiled'], g['fastprocon'])} | {_mem(g['reference'])} / {_mem(g['fastprocon'])} | "
                   f"{_ms(g['injection-reference'])} | {_ms(inj)} | {_ratio(g['injection-reference'], inj)} | "
                   f"{_mem(g['injection-reference'])} / {_mem(inj)} | {copy_pct} |")
    return out


def train_table(rows: list[dict]) -> list[str]:
    out = ["| model | params | layers x hidden | tokens/step | variant | step ms (p20-p80) | tokens/s | MFU "
           "| peak memory | step overhead | memory overhead |", "|" + "---|" * 11]
    for r in rows:
        pct = lambda key: f"{100 * float(r[key]):+.1f}%" if r[key] not in ("", None) and r["variant"] != "off" \
            else "-"                                                                       # noqa: E731
        mfu = f"{100 * float(r['mfu']):.1f}%" if r["mfu"] else "-"
        out.append(f"| {r['model']} | {int(r['params']) / 1e6:.0f}M | {r['layers']} x {r['hidden']} | "
                   f"{int(r['batch']) * int(r['seq'])} | {r['variant']} | {float(r['median_ms']):.1f} "
                   f"({float(r['p20_ms']):.1f}-{float(r['p80_ms']):.1f}) | {float(r['tokens_per_s']):.0f} | {mfu} | "
                   f"{harness.fmt_bytes(int(r['peak_mem_bytes']))} | {pct('step_overhead')} | "
                   f"{pct('mem_overhead')} |")
    return out


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if f"{lo:.2g}" == f"{hi:.2g}" else f"{fmt.format(lo)} to {fmt.format(hi)}"


def penalty_headline(rows: list[dict], tag: str) -> list[str]:
    """The penalty's goals as measured: CPU N=8192 D=2048 fp32; GPU bf16 with N x D >= 2^26.
    Forward + backward, masked rows when measured."""
    full = [r for r in rows if r["mode"] == "full"]
    if any(r["masked"] == "True" for r in full):
        full = [r for r in full if r["masked"] == "True"]
    if tag == "cpu":
        target, what = lambda r: r["dtype"] == "fp32" and (r["N"], r["D"]) == ("8192", "2048"), "fp32 N=8192 D=2048"
    else:
        target, what = lambda r: r["dtype"] == "bf16" and int(r["N"]) * int(r["D"]) >= 2**26, "bf16 N x D >= 2^26"
    by = {(r["provider"], r["N"], r["D"]): r for r in full if target(r)}
    lines = []
    for fused, ref in (("fastprocon", "reference"), ("injection", "injection-reference")):
        pairs = [(r, by.get((ref, n, d)), by.get(("compiled", n, d))) for (p, n, d), r in by.items() if p == fused]
        pairs = [(r, b, c) for r, b, c in pairs if b is not None]
        if not pairs:
            continue
        parts = ([f"over {len(pairs)} shapes"] if len(pairs) > 1 else []) + [
                 "speedup " + _span([float(b["median_ms"]) / float(r["median_ms"]) for r, b, _ in pairs], "{:.2f}x")
                 + f" over {ref}"]
        with_compiled = [(r, c) for r, _, c in pairs if c is not None and fused == "fastprocon"]
        if with_compiled:
            parts.append(_span([float(c["median_ms"]) / float(r["median_ms"]) for r, c in with_compiled], "{:.2f}x")
                         + " over compiled")
        parts.append(_span([100 * float(r["frac_of_copy"]) for r, _, _ in pairs], "{:.0f}%") + " of copy bandwidth")
        if all(r["extra_mem_bytes"] != "" and b["extra_mem_bytes"] != "" for r, b, _ in pairs):
            per_tok = lambda row: int(row["extra_mem_bytes"]) / int(row["N"])                  # noqa: E731
            parts.append(f"extra memory {_span([per_tok(r) for r, _, _ in pairs], '{:.3g}')} B/token "
                         f"(reference {_span([per_tok(b) for _, b, _ in pairs], '{:.3g}')} B/token)")
        lines.append(f"- {tag} {what}, {fused} forward + backward: " + "; ".join(parts))
    return lines


def train_headline(rows: list[dict], tag: str) -> list[str]:
    lines = []
    for r in rows:
        if r["variant"] != "off" and r["step_overhead"] != "":
            lines.append(f"- {tag} {r['model']} ({r['dtype']}, {int(r['batch']) * int(r['seq'])} tokens/step), "
                         f"ProCon {r['variant']} at all {r['layers']} layers: step time "
                         f"{100 * float(r['step_overhead']):+.1f}%, peak memory {100 * float(r['mem_overhead']):+.1f}%")
    return lines


def ops_headline(rows: list[dict], tag: str) -> list[str]:
    """Per constrained layer: operators (and CUDA launches) ProCon adds, forward and backward."""
    lines = []
    for model, layout in dict.fromkeys((r["model"], r["layout"]) for r in rows):
        of = {(r["phase"], r["counter"]): r for r in rows if (r["model"], r["layout"]) == (model, layout)}
        ops = [of.get((phase, "ops")) for phase in ("forward", "backward")]
        if None in ops:
            continue
        beyond = sum(float(r["beyond_procon_kernels"]) for r in ops)
        text = (f"- {tag} {model} {layout}: per constrained layer +{ops[0]['per_layer']} ops forward, "
                f"+{ops[1]['per_layer']} backward: the 2 ProCon ops and {beyond:g} others (target <= 4)")
        launches = [of.get((phase, "launches")) for phase in ("forward", "backward")]
        if None not in launches:
            text += f"; CUDA launches +{launches[0]['per_layer']} forward, +{launches[1]['per_layer']} backward"
        lines.append(text)
    return lines


def host_headline(rows: list[dict], tag: str) -> list[str]:
    by = {r["mode"]: r for r in rows}
    if not {"sync", "prefetch"} <= by.keys():
        return []
    return [f"- {tag} {by['sync']['model']}: training-thread host time per step outside forward+backward "
            f"{by['sync']['host_ms']} ms with the batches made on it, {by['prefetch']['host_ms']} ms with the "
            f"prefetch thread (median saving {by['prefetch']['host_saved_ms']} ms)"]


def headline(results: Path) -> list[str]:
    """Measured values for the goals, from every CSV in ``results``."""
    lines = []
    for path in sorted(results.glob("penalty_*.csv")):
        lines += penalty_headline(harness.read_csv(path, PENALTY_FIELDS), path.stem.split("_", 1)[1])
    for path in sorted(results.glob("train_*.csv")):
        lines += train_headline(harness.read_csv(path, TRAIN_FIELDS), path.stem.split("_", 1)[1])
    for path in sorted(results.glob("ops_*.csv")):
        lines += ops_headline(harness.read_csv(path, OPS_FIELDS), path.stem.split("_", 1)[1])
    for path in sorted(results.glob("host_*.csv")):
        lines += host_headline(harness.read_csv(path, HOST_FIELDS), path.stem.split("_", 1)[1])
    return lines


# One report section per benchmark CSV kind: (file prefix, heading, CSV fields, plot, table)
SECTIONS = (("penalty", "ProCon penalty, forward + backward", PENALTY_FIELDS, plot_penalty, penalty_table),
            ("train", "Training step, ProCon at every layer", TRAIN_FIELDS, plot_train, train_table))


def write_report(results: Path) -> list[Path]:
    """Figures for every CSV in ``results`` and README_perf.md; returns the written paths.
    A hand-written ``notes_<tag>.md`` (conditions of the run, caveats) is included verbatim."""
    written, md = [], ["# fastprocon performance", "",
                       "Generated by `python benchmarks/report.py` from the CSVs in this directory; "
                       "do not edit by hand. Times are medians (p20-p80 in the CSVs); *extra mem* is the peak "
                       "memory a call allocates beyond its inputs and the gradient of H it must return; "
                       "*% of copy* compares achieved bytes-floor bandwidth with `dst.copy_(H)` measured in "
                       "the same run. Targets are measured against, never asserted.", ""]
    figures = importlib.util.find_spec("matplotlib") is not None
    if not figures:
        md += ["(matplotlib is not installed here: figures were not drawn; rerun `python benchmarks/report.py` "
               "where it is.)", ""]
    penalty = sorted(results.glob("penalty_*.csv"))
    train = sorted(results.glob("train_*.csv"))
    tags = sorted({p.stem.split("_", 1)[1] for p in penalty + train})
    md += ["## Headline (the goals, as measured)", "", *headline(results), ""]
    if not any(t != "cpu" for t in tags):
        md += ["**GPU numbers are not measured yet**: run `bash benchmarks/gpu_check.sh` on a CUDA machine "
               "and commit its CSVs here.", ""]
    for tag in tags:
        md += [f"## {tag}", ""]
        if (results / f"notes_{tag}.md").is_file():
            md += [(results / f"notes_{tag}.md").read_text().strip(), ""]
        for kind, title, fields, plot, table in SECTIONS:
            csv_path = results / f"{kind}_{tag}.csv"
            if not csv_path.is_file():
                continue
            rows = harness.read_csv(csv_path, fields)
            if figures:
                written.append(plot(rows, results / f"{kind}_{tag}.png"))
            md += [f"### {title}", "", *_env_lines(rows), "", f"![{kind} {tag}]({kind}_{tag}.png)", "",
                   *table(rows), ""]
    path = results / "README_perf.md"
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(md))
    return written + [path]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=harness.RESULTS_DIR, help="directory holding the CSVs")
    p.add_argument("--headline", action="store_true",
                   help="only print the measured values for the targets (writes nothing)")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        raise SystemExit(f"results directory not found: {args.results}")
    if args.headline:
        print("\n".join(headline(args.results)) or f"no results in {args.results}")
        return 0
    for path in write_report(args.results):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
