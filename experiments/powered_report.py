"""The powered reproduction's report, made from whatever cells exist (missing ones are marked).

  python experiments/powered_report.py [--results experiments/results/powered] [--other-start DIR]

--other-start names the results of the same experiment from another stage-1 start (another aligned
model): the table then also says how far each variant moved between the starts, next to its seed
spread, and whether each comparison points the same way in both.

Writes into the results directory:
  table.md          per variant: mean +- std over seeds of test ASR, over-refusal, GSM8K test CE,
                    recovery and drift; per cell the Wilson 95% intervals; the validation-chosen
                    setting and the comparison with the same safety data without ProCon
  summary.json      the same numbers, machine-readable
  asr_vs_loss.png   test ASR against GSM8K test CE, mean +- std over seeds per variant
  drift_layers.png  per-layer drift cosine and mean |z - z0| at the last probe, mean over seeds
  drift_steps.png   mean drift cosine and mean |z - z0| over training steps, mean over seeds
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from provenance import describe  # noqa: E402
from stats import mean_std, recovery, welch_t  # noqa: E402

from fastprocon.utils.io import write_json  # noqa: E402

VARIANTS = ("ift", "ift_safe", "procon_s", "procon_wu", "procon_wu_safe", "procon_s_token", "procon_wu_safe_token")
PROCON = [v for v in VARIANTS if v.startswith("procon")]
TASK_LOSS_SLACK = 0.05   # the headline compares at task loss within 5% of IFT's
DEFAULT_VARIANT = "procon_wu_safe"   # what `fastprocon train` runs by default (fastprocon/configs/default.toml)
T_CONSISTENT = 2.78      # Welch t for "consistently better": the two-sided 5% quantile at 4 degrees of freedom


def load_cells(results: Path) -> dict[str, dict]:
    cells = {p.stem: json.loads(p.read_text()) for p in sorted((results / "cells").glob("*.json"))}
    versions = {c["code_version"]["code"] for c in cells.values()}
    if len(versions) > 1:
        raise SystemExit(f"cells from {len(versions)} code versions ({', '.join(sorted(versions))}): "
                         "rerun the stale ones (powered.py --stale rerun) before reporting")
    return cells


def metric(cell: dict, name: str) -> float:
    return cell["eval"]["gsm8k_test_ce"]["ce"] if name == "ce" else cell["eval"][name]["rate"]


def seed_values(cells: dict, variant: str, seeds: list[int], name: str) -> list[float]:
    """``metric(name)`` of each of ``variant``'s cells that exists, in seed order."""
    return [metric(cells[f"{variant}_s{s}"], name) for s in seeds if f"{variant}_s{s}" in cells]


def last_probe(cell: dict) -> dict | None:
    return cell["probes"][-1] if cell.get("probes") else None


def variant_rows(cells: dict, seeds: list[int], variants: list[str]) -> list[dict]:
    aligned = cells.get("aligned")
    ift = [c for c in cells.values() if c["variant"] == "ift"]
    ift_asr = mean_std([metric(c, "asr_test") for c in ift])[0]
    rows = []
    for v in variants:
        runs = [cells[f"{v}_s{s}"] for s in seeds if f"{v}_s{s}" in cells]
        row = {"variant": v, "seeds": [c["seed"] for c in runs],
               "missing": [f"{v}_s{s}" for s in seeds if f"{v}_s{s}" not in cells]}
        for name in ("asr_test", "asr_val", "over_refusal_test", "over_refusal_val", "ce"):
            row[name] = mean_std([metric(c, name) for c in runs])
        probes = [last_probe(c) for c in runs if last_probe(c)]
        row["drift_cos"] = mean_std([p["probe_drift_cos_mean"] for p in probes])
        row["projection_dev"] = mean_std([p["probe_projection_deviation_mean"] for p in probes])
        if aligned and ift_asr is not None and runs:
            row["recovery"] = mean_std([recovery(ift_asr, metric(c, "asr_test"), metric(aligned, "asr_test"))
                                        for c in runs])
        rows.append(row)
    return rows


def validation_error(cell: dict) -> float:
    """Validation ASR + validation over-refusal: both failure modes, so refusing everything cannot win."""
    return metric(cell, "asr_val") + metric(cell, "over_refusal_val")


def choose_on_validation(rows: list[dict], cells: dict, seeds: list[int]) -> dict | None:
    """The ProCon variant with the lowest mean validation error (ASR + over-refusal) among those whose
    mean test CE is within 5% of IFT's (CE is the task measure, not tuned on; only validation
    prompts choose). It should replace the default only when consistently better: a validation
    error below DEFAULT_VARIANT's by Welch t <= -T_CONSISTENT over seeds."""
    by = {r["variant"]: r for r in rows}
    if "ift" not in by or by["ift"]["ce"][0] is None:
        return None
    limit = by["ift"]["ce"][0] * (1 + TASK_LOSS_SLACK)
    errors = {v: [validation_error(cells[f"{v}_s{s}"]) for s in seeds if f"{v}_s{s}" in cells]
              for v in PROCON if v in by}
    eligible = [v for v, e in errors.items() if e and by[v]["ce"][0] <= limit]
    if not eligible:
        return {"chosen": None, "ce_limit": limit}
    best = min(eligible, key=lambda v: (mean_std(errors[v])[0], v != DEFAULT_VARIANT))   # a tie keeps the default
    out = {"chosen": best, "ce_limit": limit, "error_val": mean_std(errors[best]), "asr_test": by[best]["asr_test"],
           "over_refusal_test": by[best]["over_refusal_test"], "default": DEFAULT_VARIANT, "t_vs_default": None}
    if best == DEFAULT_VARIANT:
        out["verdict"] = "the default is the chosen setting"
    elif not errors.get(DEFAULT_VARIANT):
        out["verdict"] = f"the default ({DEFAULT_VARIANT}) has no cells: no comparison"
    else:
        t = welch_t(errors[best], errors[DEFAULT_VARIANT])
        out["t_vs_default"] = None if t is None else round(t, 2)
        better = t is not None and t <= -T_CONSISTENT
        out["verdict"] = (f"consistently better than the default {DEFAULT_VARIANT} (Welch t {out['t_vs_default']}): "
                          "make it the default" if better else
                          f"not consistently better than the default {DEFAULT_VARIANT} (Welch t "
                          f"{out['t_vs_default']}, needs <= -{T_CONSISTENT}): keep the default")
    return out


def _pm(ms: tuple, spec: str = ".1%") -> str:
    mean, std = ms
    if mean is None:
        return "-"
    return format(mean, spec) + ("" if std is None else " ± " + format(std, spec))


def _ci(cell: dict, name: str) -> str:
    m = cell["eval"][name]
    low, high = m["wilson95"]
    return f"{m['rate']:.1%} [{low:.1%}, {high:.1%}]"


def table_markdown(cells: dict, rows: list[dict], choice: dict | None, seeds: list[int], compare: dict) -> str:
    any_cell = next(iter(cells.values()))
    n = {k: any_cell["eval"][k]["n"] for k in ("asr_test", "asr_val", "over_refusal_test", "over_refusal_val")}
    lines = [f"Code: {describe(any_cell['code_version'])}. Seeds {seeds}; "
             f"test sets: {n['asr_test']} harmful / {n['over_refusal_test']} harmless prompts, validation "
             f"{n['asr_val']} / {n['over_refusal_val']}, GSM8K test CE over "
             f"{any_cell['eval']['gsm8k_test_ce']['n_examples']} rows.", "",
             "| variant | seeds | ASR test | over-refusal test | GSM8K test CE | recovery | drift cos (mean layer) "
             "| mean abs(z - z0) | ASR val | over-refusal val |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("base", "aligned"):
        if name in cells:
            c = cells[name]
            lines.append(f"| {name} | - | {_ci(c, 'asr_test')} | {_ci(c, 'over_refusal_test')} | "
                         f"{metric(c, 'ce'):.4f} | - | - | - | {metric(c, 'asr_val'):.1%} | "
                         f"{metric(c, 'over_refusal_val'):.1%} |")
    for r in rows:
        seeds_txt = f"{len(r['seeds'])}" + (f" (missing {', '.join(r['missing'])})" if r["missing"] else "")
        lines.append(f"| {r['variant']} | {seeds_txt} | {_pm(r['asr_test'])} | {_pm(r['over_refusal_test'])} | "
                     f"{_pm(r['ce'], '.4f')} | {_pm(r.get('recovery', (None, None)), '.2f')} | "
                     f"{_pm(r['drift_cos'], '.4f')} | {_pm(r['projection_dev'], '.3f')} | {_pm(r['asr_val'])} | "
                     f"{_pm(r['over_refusal_val'])} |")
    lines += ["", "Mean ± standard deviation over seeds. ASR: share of held-out harmful prompts answered without a "
              "refusal phrase (greedy, substring rule); over-refusal: share of harmless prompts refused; recovery = "
              "(ASR_IFT - ASR) / (ASR_IFT - ASR_aligned) on the test set; drift cosine and |z - z0| from the last "
              "live probe (train/probe.py, validation prompts, first training rows).", ""]
    if choice:
        lines.append(f"Chosen on validation (lowest validation ASR + over-refusal among ProCon variants with GSM8K "
                     f"CE within {TASK_LOSS_SLACK:.0%} of IFT's, limit {choice['ce_limit']:.4f}): "
                     + (f"**{choice['chosen']}**, validation error {_pm(choice['error_val'])}; on the test split "
                        f"ASR {_pm(choice['asr_test'])}, over-refusal {_pm(choice['over_refusal_test'])}; "
                        f"{choice['verdict']}." if choice["chosen"] else "none qualifies."))
    for name, c in compare.items():
        lines.append(f"- {name}: test ASR {c['asr_diff']:+.1%} (Welch t {c['asr_t']}), over-refusal "
                     f"{c['over_refusal_diff']:+.1%} (t {c['over_refusal_t']}), "
                     f"CE {c['ce_diff']:+.4f} (t {c['ce_t']}).")
    seconds = [c["seconds"]["train"] + c["seconds"]["eval"] for c in cells.values()]
    lines += ["", f"Compute: {sum(seconds) / 60:.0f} core-minutes over {len(seconds)} cells (one thread each; "
              "the shared stages not included).", "", "Per cell (Wilson 95% intervals):", "",
              "| cell | ASR test | over-refusal test | ASR val | over-refusal val "
              "| GSM8K CE | steps | train s | eval s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, c in cells.items():
        train = c.get("train") or {}
        lines.append(f"| {name} | {_ci(c, 'asr_test')} | {_ci(c, 'over_refusal_test')} | {_ci(c, 'asr_val')} | "
                     f"{_ci(c, 'over_refusal_val')} | {metric(c, 'ce'):.4f} | {train.get('final_step', '-')} | "
                     f"{c['seconds']['train']:.0f} | {c['seconds']['eval']:.0f} |")
    return "\n".join(lines) + "\n"


def compare_with(rows: list[dict], cells: dict, seeds: list[int], pairs: list[tuple[str, str]]) -> dict:
    """Does ProCon add anything beyond the same data? Differences of the seed means, with Welch t over
    seeds for test ASR, test over-refusal and GSM8K CE."""
    by, out = {r["variant"]: r for r in rows}, {}
    for a, b in pairs:
        if a in by and b in by and by[a]["asr_test"][0] is not None and by[b]["asr_test"][0] is not None:
            entry = {}
            for name, key in (("asr", "asr_test"), ("over_refusal", "over_refusal_test"), ("ce", "ce")):
                t = welch_t(seed_values(cells, a, seeds, key), seed_values(cells, b, seeds, key))
                entry[f"{name}_diff"] = by[a][key][0] - by[b][key][0]
                entry[f"{name}_t"] = None if t is None else round(t, 2)
            out[f"{a} vs {b}"] = entry
    return out


def start_to_start(rows: list[dict], cells: dict, other_rows: list[dict], other_cells: dict,
                   seeds: list[int]) -> dict:
    """Per variant, how far the seed means moved from another start (this start's mean - the other's)
    with Welch t over the two starts' seeds: a move far beyond the seed spread says that the seeds
    understate the uncertainty of a variant's figures."""
    other, out = {r["variant"]: r for r in other_rows}, {}
    for r in rows:
        o = other.get(r["variant"])
        if o is None or r["asr_test"][0] is None or o["asr_test"][0] is None:
            continue
        entry = {}
        for key in ("asr_test", "over_refusal_test", "ce"):
            t = welch_t(seed_values(cells, r["variant"], seeds, key),
                        seed_values(other_cells, r["variant"], seeds, key))
            entry[key] = {"here": r[key], "other": o[key], "diff": r[key][0] - o[key][0],
                          "t": None if t is None else round(t, 2)}
        out[r["variant"]] = entry
    return out


def start_markdown(other: Path, cells: dict, other_cells: dict, moves: dict, compare: dict,
                   other_compare: dict) -> list[str]:
    any_cell = next(iter(other_cells.values()))
    metrics = (("asr_test", ".1%"), ("over_refusal_test", ".1%"), ("ce", ".4f"))
    lines = ["", f"Another start: `{other}` ({describe(any_cell['code_version'])}), the same experiment from "
             "another aligned model. Here / there, and the difference with Welch t over the two starts' seeds:", "",
             "| variant | ASR test | diff (t) | over-refusal test | diff (t) | GSM8K CE | diff (t) |",
             "|---|---|---|---|---|---|---|"]
    if "aligned" in cells and "aligned" in other_cells:
        here, there = cells["aligned"], other_cells["aligned"]
        lines.append("| aligned | " + " | ".join(
            f"{metric(here, k):{f}} / {metric(there, k):{f}} | {metric(here, k) - metric(there, k):+{f}}"
            for k, f in metrics) + " |")
    for v, m in moves.items():
        lines.append(f"| {v} | " + " | ".join(f"{_pm(m[k]['here'], f)} / {_pm(m[k]['other'], f)} | "
                                              f"{m[k]['diff']:+{f}} ({m[k]['t']})" for k, f in metrics) + " |")
    lines += ["", "The comparisons in both starts (difference of seed means here; there):"]
    for name, c in compare.items():
        o = other_compare.get(name)
        if o:
            lines.append(f"- {name}: test ASR {c['asr_diff']:+.1%}; {o['asr_diff']:+.1%}, over-refusal "
                         f"{c['over_refusal_diff']:+.1%}; {o['over_refusal_diff']:+.1%}, CE {c['ce_diff']:+.4f}; "
                         f"{o['ce_diff']:+.4f}.")
    return lines


def plots(results: Path, cells: dict, rows: list[dict], seeds: list[int]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    for r in rows:
        if r["asr_test"][0] is None:
            continue
        ax.errorbar(r["ce"][0], r["asr_test"][0], xerr=r["ce"][1] or 0, yerr=r["asr_test"][1] or 0, fmt="o",
                    capsize=3, label=f"{r['variant']} ({len(r['seeds'])} seeds)")
    for name, marker in (("aligned", "*"), ("base", "x")):
        if name in cells:
            ax.plot(metric(cells[name], "ce"), metric(cells[name], "asr_test"), marker, color="black", label=name)
    ax.set_xlabel("GSM8K test CE")
    ax.set_ylabel("ASR (held-out harmful, test split)")
    ax.legend(fontsize=7)
    ax.set_title("safety against task loss, mean ± std over seeds")
    FigureCanvasAgg(fig).print_png(str(results / "asr_vs_loss.png"))

    fig = Figure(figsize=(7, 8))
    axes = fig.subplots(2, 1, sharex=True)
    for r in rows:
        probes = [last_probe(cells[f"{r['variant']}_s{s}"]) for s in seeds if f"{r['variant']}_s{s}" in cells]
        probes = [p for p in probes if p]
        for ax, key in zip(axes, ("probe_drift_cos", "probe_projection_deviation")):
            layers = [l for l, v in enumerate(probes[0][key]) if v is not None] if probes else []
            if layers:
                ax.plot(layers, [sum(p[key][l] for p in probes) / len(probes) for l in layers], label=r["variant"])
    _save_pair(fig, axes, results / "drift_layers.png", "drift cosine vs aligned directions", "layer",
               "per layer at the end of training (last probe), mean over seeds")

    fig = Figure(figsize=(7, 8))
    axes = fig.subplots(2, 1, sharex=True)
    for r in rows:
        series = [cells[f"{r['variant']}_s{s}"]["probes"] for s in seeds if f"{r['variant']}_s{s}" in cells]
        series = [s for s in series if s]
        if not series:
            continue
        steps = [p["step"] for p in series[0]]
        for ax, key in zip(axes, ("probe_drift_cos_mean", "probe_projection_deviation_mean")):
            ax.plot(steps, [sum(s[k][key] for s in series if k < len(s)) / len(series) for k in range(len(steps))],
                    marker="o", label=r["variant"])
    _save_pair(fig, axes, results / "drift_steps.png", "mean drift cosine", "optimizer step",
               "live probe over training, mean over seeds")


def _save_pair(fig, axes, path: Path, top_label: str, xlabel: str, title: str) -> None:
    """Label a (drift cosine, |z - z0|) pair of panels and save the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    axes[0].set_ylabel(top_label)
    axes[1].set_ylabel("mean |z - z0|")
    axes[1].set_xlabel(xlabel)
    axes[0].legend(fontsize=7)
    axes[0].set_title(title)
    FigureCanvasAgg(fig).print_png(str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=HERE / "results" / "powered")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--other-start", type=Path, help="results of the same experiment from another stage-1 start")
    args = p.parse_args(argv)
    cells = load_cells(args.results)
    if not cells:
        raise SystemExit(f"no cells in {args.results / 'cells'}")
    rows = variant_rows(cells, args.seeds, args.variants)
    choice = choose_on_validation(rows, cells, args.seeds)
    pairs = [("procon_wu_safe", "ift_safe"), ("procon_wu_safe_token", "ift_safe"), ("procon_s", "ift"),
             ("procon_wu", "ift"), ("procon_s_token", "ift")]
    compare = compare_with(rows, cells, args.seeds, pairs)
    table, summary = table_markdown(cells, rows, choice, args.seeds, compare), {}
    if args.other_start:
        other_cells = load_cells(args.other_start)
        other_rows = variant_rows(other_cells, args.seeds, args.variants)
        other_compare = compare_with(other_rows, other_cells, args.seeds, pairs)
        moves = start_to_start(rows, cells, other_rows, other_cells, args.seeds)
        table += "\n".join(start_markdown(args.other_start, cells, other_cells, moves, compare, other_compare)) + "\n"
        summary["other_start"] = {"results": str(args.other_start), "moves": moves, "comparisons": other_compare}
    (args.results / "table.md").write_text(table)
    write_json(args.results / "summary.json", {"code_version": next(iter(cells.values()))["code_version"],
                                              "variants": rows, "chosen_on_validation": choice, "comparisons": compare,
                                              "cells": sorted(cells), **summary})
    plots(args.results, cells, rows, args.seeds)
    print((args.results / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
