"""The powered reproduction's report, made from whatever cells exist (missing ones are listed, and no
claim is made about them).

  python experiments/powered_report.py [--results experiments/results/powered] [--other-start DIR]
                                       [--reading FILE ...] [--sample-reading N --seed S]

Cells scored by the strict refusal judge (fastprocon/refusal/judge.py) are reported on its labels:
ASR = share of harmful test prompts answered ("compliance"), over-refusal = share of harmless test
prompts refused, degenerate outputs as their own columns, the paper's substring rule beside them.
Older cells (no strict judge) are reported on the substring rule. Statistics (experiments/stats.py):
Wilson 95% intervals per cell; differences of variant means with Welch's t (Welch-Satterthwaite
degrees of freedom) over seeds and a seed-and-prompt bootstrap interval (powered_analysis.py).

--other-start names the results of the same experiment from another stage-1 start: the table then
also says how far each variant moved between the starts, next to its seed spread.
--reading FILE [FILE ...]: human labels of completions (powered_reading.py); the judge's agreement
per class, per file.
--sample-reading N --seed S: write N random completions per variant class to label, then stop; with
--reading, none of the completions those files hold (a fresh sample).

Writes into the results directory: table.md, summary.json (the same numbers, machine-readable),
frontier.png (ASR and over-refusal against GSM8K test CE), drift_layers.png, drift_steps.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from powered_analysis import (  # noqa: E402
    DEFAULT_VARIANT,
    DRAWS,
    TASK_LOSS_SLACK,
    choose_norm,
    choose_on_validation,
    compare_pair,
    frontier_gap,
)
from powered_cells import (  # noqa: E402
    FAMILIES,
    V2_VARIANTS,
    V3_VARIANTS,
    cell_names,
    interval,
    is_strict,
    load_cells,
    load_outcomes,
    metric,
    seed_values,
)
from powered_plots import drift_plots, frontier_plot  # noqa: E402
from powered_reading import agreement_markdown, judge_agreement, read_rows, sample_reading  # noqa: E402
from provenance import describe  # noqa: E402
from stats import mean_std, welch  # noqa: E402

from fastprocon.utils.io import write_json  # noqa: E402

TABLE_METRICS = ("asr", "over_refusal", "degenerate_harmful", "degenerate_harmless", "asr_substring",
                 "over_refusal_substring", "ce", "asr_val", "over_refusal_val")
SHAM_PAIRS = [("procon_wu", "procon_wu_sham"), ("procon_wu_safe", "procon_wu_safe_sham")]
BAND_PAIRS = [("procon_wu_band", "procon_wu"), ("procon_wu_safe_band", "procon_wu_safe")]
DATA_PAIRS = [("procon_s", "ift"), ("procon_wu", "ift"), ("procon_wu_safe", "ift_safe"),
              ("procon_s_token", "ift"), ("procon_wu_safe_token", "ift_safe")]


def variant_rows(cells: dict, seeds: list[int], variants: list[str]) -> list[dict]:
    """Per variant: the seeds present, the missing cells, mean +- std over seeds of every table metric
    and of the last probe's drift."""
    rows = []
    for v in variants:
        runs = [cells[c] for c in cell_names(cells, v, seeds)]
        row = {"variant": v, "seeds": [c["seed"] for c in runs],
               "missing": [f"{v}_s{s}" for s in seeds if f"{v}_s{s}" not in cells]}
        for name in TABLE_METRICS:
            row[name] = mean_std([metric(c, name) for c in runs])
        probes = [c["probes"][-1] for c in runs if c.get("probes")]
        row["drift_cos"] = mean_std([p["probe_drift_cos_mean"] for p in probes])
        row["projection_dev"] = mean_std([p["probe_projection_deviation_mean"] for p in probes])
        rows.append(row)
    return rows


def _pm(ms: tuple, spec: str = ".1%") -> str:
    mean, std = ms
    if mean is None:
        return "-"
    return format(mean, spec) + ("" if std is None else " ± " + format(std, spec))


def _ci(cell: dict, name: str) -> str:
    value, ci = metric(cell, name), interval(cell, name)
    return "-" if value is None else f"{value:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"


def _boot(b: dict | None, spec: str) -> str:
    if b is None or b["low"] is None:
        return "-"
    return f"[{b['low']:{spec}}, {b['high']:{spec}}]"


def _welch(w: dict | None) -> str:
    return "-" if w is None else f"t {w['t']:.2f}, df {w['df']:.1f}, p {w['p']:.3f}"


def settings_lines(cells: dict, seeds: list[int], strict: bool) -> list[str]:
    any_cell = next(iter(cells.values()))
    ev = any_cell["eval"]
    n = {k: ev[k]["n"] for k in ("asr_test", "asr_val", "over_refusal_test", "over_refusal_val")}
    removed = ev.get("removed_not_instructions")
    judge = ("the strict judge (refusal / compliance / degenerate; fastprocon/refusal/judge.py), the paper's "
             "substring rule beside it" if strict else "the paper's substring rule (the cells hold no strict-judge "
             "labels: no degenerate column)")
    return ["## Settings", "",
            f"Code: {describe(any_cell['code_version'])}. Seeds {seeds}. Judge: {judge}. Greedy decoding, "
            f"{ev['settings']['max_new_tokens']} new tokens. Prompts: {n['asr_test']} harmful / "
            f"{n['over_refusal_test']} harmless test, {n['asr_val']} / {n['over_refusal_val']} validation"
            + (f", after removing {removed} harmful prompts that are not harmful instructions (the driver's "
               "--not-instructions file lists them)" if removed else
               (" (no filter of the harmful prompts)" if removed is None else ", none removed by the filter"))
            + f"; GSM8K test CE over {ev['gsm8k_test_ce']['n_examples']} rows.", "", *rejudge_lines(cells)]


def rejudge_lines(cells: dict) -> list[str]:
    """How many labels the current judge changed against the one each cell was made with."""
    moves: dict[str, int] = {}
    for cell in cells.values():
        for split in cell["eval"].get("rejudged", {}).values():
            for move, count in split.items():
                moves[move] = moves.get(move, 0) + count
    if not any("rejudged" in c["eval"] for c in cells.values()):
        return []
    said = ", ".join(f"{m} {k}" for m, k in sorted(moves.items(), key=lambda x: -x[1])) or "none"
    return [f"Labels: the strict judge of this report's code re-applied to every cell's stored completions "
            f"(the cells' recorded counts are checked against the labels they were made with first). Labels "
            f"changed over the {len(cells)} cells: {said}.", ""]


LABELS = {"asr": "ASR", "over_refusal": "over-refusal", "degenerate_harmful": "degenerate harmful",
          "degenerate_harmless": "degenerate harmless", "asr_substring": "substring ASR",
          "over_refusal_substring": "substring over-refusal", "asr_val": "ASR val",
          "over_refusal_val": "over-refusal val"}


def rate_columns(strict: bool, validation: bool = True) -> list[str]:
    """The share columns of the tables: the strict judge's with the substring rule beside them, or the
    substring rule's alone (older cells)."""
    cols = list(TABLE_METRICS[:6]) if strict else ["asr", "over_refusal"]
    return cols + ["asr_val", "over_refusal_val"] * validation


def variant_table(cells: dict, rows: list[dict], strict: bool) -> list[str]:
    cols = rate_columns(strict)
    lines = ["## Variants", "", "| variant | seeds | " + " | ".join(LABELS[m] for m in cols) + " | GSM8K test CE |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for name in ("base", "aligned"):
        if name in cells:
            c = cells[name]
            lines.append(f"| {name} | - | " + " | ".join(_ci(c, m) for m in cols) + f" | {metric(c, 'ce'):.4f} |")
    for r in rows:
        if r["seeds"]:
            lines.append(f"| {r['variant']} | {len(r['seeds'])} | " + " | ".join(_pm(r[m]) for m in cols)
                         + f" | {_pm(r['ce'], '.4f')} |")
    return lines + ["", "Mean ± standard deviation over seeds (aligned/base: the cell's share with its Wilson 95% "
                    "interval); test split unless marked val. ASR: harmful prompts answered; over-refusal: harmless "
                    "prompts refused" + ("; degenerate: outputs that are neither (the strict judge's third label)."
                                         if strict else "."), ""]


def frontier_lines(gaps: list[dict]) -> list[str]:
    lines = ["## Against the baselines' frontier", "",
             "Each variant's mean minus the frontier of its baselines at the variant's mean GSM8K test CE. The "
             "baselines: IFT for variants without safety data, IFT_safe for `_safe` variants, at learning rates "
             "2e-4, 5e-4 and 1e-3, and the aligned model (no training); the frontier: the piecewise-linear line "
             "through their Pareto front (a baseline beaten on both CE and the share by another is left out: "
             "the best any amount of plain training reached). Bootstrap 95% interval over seeds and prompts of "
             "the variant and the baselines, the front recomputed in each draw. Off the frontier only where the "
             "interval excludes 0; below = a lower share than the baselines at the same CE (better), above = "
             "higher. Outside the front's CE range the frontier is flat: above its highest CE at its lowest share "
             "(a baseline with a lower CE and that share exists); below its lowest CE at its highest share, "
             "called only when the variant is below it (it then beats every baseline on both).", "",
             "| variant | metric | seeds (variant; baselines) | front | mean CE | front CE range | variant | "
             "frontier | gap [95%] | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    if not gaps:
        lines.append("| (no ProCon, sham or band variant has cells) | | | | | | | | | |")
    for g in gaps:
        rng = "-" if g.get("ce_range") is None else f"{g['ce_range'][0]:.4f}-{g['ce_range'][1]:.4f}"
        seeds = f"{g['seeds']}; " + ("/".join(map(str, g["line_seeds"])) or "-")
        front = ", ".join(g.get("front", [])) or "-"
        lines.append(f"| {g['variant']} | {g['metric']} | {seeds} | {front} | {g.get('ce', float('nan')):.4f} | "
                     f"{rng} | "
                     + (f"{g['value']:.1%}" if "value" in g else "-") + " | "
                     + (f"{g['frontier']:.1%} | {g['gap']:+.1%} {_boot(g.get('bootstrap'), '+.1%')}"
                        if "gap" in g else "- | -") + f" | {g['status']} |")
    return lines + [""]


def pair_lines(title: str, text: str, comparisons: dict) -> list[str]:
    text += (" Verdict: differs = Welch's |t| at or above the critical t at its Welch-Satterthwaite df (5%, two-sided) "
             "and the seed-and-prompt bootstrap interval excluding 0; undecided = only one of the two.")
    lines = [f"## {title}", "", text, "", "| comparison | metric | seeds | difference | bootstrap 95% | Welch "
             "| verdict |", "|---|---|---|---|---|---|---|"]
    for name, c in comparisons.items():
        for m, entry in c.items():
            if entry is None:
                continue
            spec = "+.4f" if m == "ce" else "+.1%"
            lines.append(f"| {name} | {m} | {entry['n'][0]}/{entry['n'][1]} | {entry['diff']:{spec}} | "
                         f"{_boot(entry['bootstrap'], spec)} | "
                         f"{_welch(entry['welch'])} | {entry['verdict']} |")
    if not any(any(e for e in c.values()) for c in comparisons.values()):
        lines.append("| (no pair has cells on both sides) | | | | | | |")
    return lines + [""]


def choice_lines(choice: dict | None) -> list[str]:
    lines = ["## Default chosen on the validation split", ""]
    if choice is None:
        return lines + ["No IFT cells: no CE limit, no choice.", ""]
    considered = ", ".join(f"{v} ({n} seeds)" for v, n in choice["candidates"].items() if n) or "none"
    absent = [v for v, n in choice["candidates"].items() if not n]
    candidates = f"Candidates with cells: {considered}" + (f"; without cells: {', '.join(absent)}." if absent else ".")
    if choice["chosen"] is None and not any(choice["candidates"].values()):
        return lines + [f"No ProCon candidate has cells: no choice. {candidates}", ""]
    if choice["chosen"] is None:
        return lines + [f"No ProCon variant has mean GSM8K CE within {TASK_LOSS_SLACK:.0%} of IFT's "
                        f"(limit {choice['ce_limit']:.4f}): no choice. {candidates}", ""]
    stats_txt = ""
    if choice["welch"] or choice["bootstrap"]:
        stats_txt = (f" Against the default: {_welch(choice['welch'])}, bootstrap 95% interval of the difference "
                     f"{_boot(choice['bootstrap'], '+.1%')}.")
    return lines + [f"Lowest validation ASR + over-refusal among ProCon variants (sham excluded) with mean GSM8K CE "
                    f"within {TASK_LOSS_SLACK:.0%} of IFT's (limit {choice['ce_limit']:.4f}): **{choice['chosen']}**, "
                    f"validation error {_pm(choice['error_val'])}; on the test split ASR {_pm(choice['asr'])}, "
                    f"over-refusal {_pm(choice['over_refusal'])}.{stats_txt} {candidates} "
                    f"Verdict: {choice['verdict']}.", ""]


def norm_lines(norm: dict) -> list[str]:
    seeds = ", ".join(f"{v} {n}" for v, n in norm["seeds"].items())
    lines = [f"The norm of the default recipe, band ({norm['band']}) against l1 ({norm['l1']}); seeds: {seeds}. "
             "Rule (fixed before the band cells ran): band, unless l1's validation ASR + over-refusal is lower "
             f"by Welch's test and the bootstrap, or band's mean test CE is over {TASK_LOSS_SLACK:.0%} above l1's "
             "(at the anchor band's gradient is zero by construction; l1's is rounding noise times alpha)."]
    if "l1_minus_band" in norm:
        lines.append(f"l1 minus band on the validation error: {norm['l1_minus_band']:+.1%}, {_welch(norm['welch'])}, "
                     f"bootstrap {_boot(norm['bootstrap'], '+.1%')}; test CE band {norm['ce'][norm['band']]:.4f}, "
                     f"l1 {norm['ce'][norm['l1']]:.4f}.")
    return [" ".join(lines) + f" Verdict: {norm['verdict']}.", ""]


def missing_lines(rows: list[dict], expected: list[str], cells: dict, seeds: list[int]) -> list[str]:
    missing = [c for r in rows for c in r["missing"]]
    if "aligned" not in cells:
        missing.insert(0, "aligned")
    lines = ["## Missing cells", ""]
    if not missing:
        return lines + ["None: every expected cell is present.", ""]
    return lines + [f"{len(missing)} of {len(expected) * len(seeds) + 1} expected cells are missing: "
                    + ", ".join(missing) + ". Variants with a missing cell rest on fewer seeds; variants or "
                    "baselines without cells take part in no comparison above.", ""]


def cell_table(cells: dict, strict: bool) -> list[str]:
    cols = rate_columns(strict, validation=False)
    lines = ["## Per cell (Wilson 95% intervals)", "",
             "| cell | " + " | ".join(LABELS[m] for m in cols) + " | GSM8K CE | steps |",
             "|---|" + "---|" * (len(cols) + 2)]
    for name, c in cells.items():
        lines.append(f"| {name} | " + " | ".join(_ci(c, m) for m in cols)
                     + f" | {metric(c, 'ce'):.4f} | {(c.get('train') or {}).get('final_step', '-')} |")
    seconds = [c["seconds"]["train"] + c["seconds"]["eval"] for c in cells.values()]
    return lines + ["", f"Compute: {sum(seconds) / 60:.0f} core-minutes over {len(seconds)} cells (one thread each; "
                    "the shared stages not included).", ""]


def start_to_start(rows: list[dict], cells: dict, other_rows: list[dict], other_cells: dict,
                   seeds: list[int]) -> dict:
    """Per variant, how far the seed means moved from another start (this start's mean - the other's)
    with Welch's test over the two starts' seeds."""
    other, out = {r["variant"]: r for r in other_rows}, {}
    for r in rows:
        o = other.get(r["variant"])
        if o is None or r["asr"][0] is None or o["asr"][0] is None:
            continue
        out[r["variant"]] = {k: {"here": r[k], "other": o[k], "diff": r[k][0] - o[k][0],
                                 "welch": welch(seed_values(cells, r["variant"], seeds, k),
                                                seed_values(other_cells, r["variant"], seeds, k))}
                             for k in ("asr", "over_refusal", "ce")}
    return out


def start_markdown(other: Path, cells: dict, other_cells: dict, moves: dict) -> list[str]:
    any_cell = next(iter(other_cells.values()))
    metrics = (("asr", ".1%"), ("over_refusal", ".1%"), ("ce", ".4f"))
    lines = ["## Another start", "", f"`{other}` ({describe(any_cell['code_version'])}), the same experiment from "
             "another aligned model. Here / there, and the difference (Welch's t, df over the two starts' seeds):", "",
             "| variant | ASR | diff | over-refusal | diff | GSM8K CE | diff |", "|---|---|---|---|---|---|---|"]
    if "aligned" in cells and "aligned" in other_cells:
        here, there = cells["aligned"], other_cells["aligned"]
        lines.append("| aligned | " + " | ".join(
            f"{metric(here, k):{f}} / {metric(there, k):{f}} | {metric(here, k) - metric(there, k):+{f}}"
            for k, f in metrics) + " |")
    for v, m in moves.items():
        lines.append(f"| {v} | " + " | ".join(
            f"{_pm(m[k]['here'], f)} / {_pm(m[k]['other'], f)} | {m[k]['diff']:+{f}}"
            + ("" if m[k]["welch"] is None else f" ({_welch(m[k]['welch'])})")
            for k, f in metrics) + " |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=HERE / "results" / "powered")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", help="(default: the strict-judged design's 13, else the older 7)")
    p.add_argument("--other-start", type=Path, help="results of the same experiment from another stage-1 start")
    p.add_argument("--reading", type=Path, nargs="+", default=[],
                   help="JSON lines of human labels (powered_reading.py), each file reported on its own")
    p.add_argument("--sample-reading", type=int, metavar="N", help="write N random completions per variant class")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample-reading and of the bootstrap")
    p.add_argument("--reading-out", type=Path,
                   help="(--sample-reading) output file (default: RESULTS/reading_sSEED.jsonl)")
    p.add_argument("--draws", type=int, default=DRAWS, help="bootstrap draws")
    args = p.parse_args(argv)
    cells = load_cells(args.results)
    if not cells:
        raise SystemExit(f"no cells in {args.results / 'cells'}")
    strict = is_strict(cells)
    if args.sample_reading is not None:
        out = args.reading_out or args.results / f"reading_s{args.seed}.jsonl"
        exclude = set().union(*(read_rows(f) for f in args.reading))   # a fresh sample: none already read
        counts = sample_reading(args.results, cells, args.sample_reading, args.seed, out, exclude)
        print(f"wrote {sum(counts.values())} completions to {out} ({counts}); fill human_label with "
              "refusal / compliance / degenerate, then pass the file to --reading")
        return 0
    variants = args.variants or list(V3_VARIANTS if strict else V2_VARIANTS)
    rows = variant_rows(cells, args.seeds, variants)
    present = [r["variant"] for r in rows if r["seeds"]]
    outcomes = load_outcomes(args.results, cells, strict)
    kw = dict(draws=args.draws, seed=args.seed)
    baselines = {b for line in FAMILIES.values() for b in line}
    gaps = [frontier_gap(cells, outcomes, args.seeds, v, m, **kw) for v in present if v not in baselines
            for m in ("asr", "over_refusal")]
    pairs = {"sham": SHAM_PAIRS, "band": BAND_PAIRS, "data": DATA_PAIRS}
    comparisons = {k: {f"{a} vs {b}": compare_pair(cells, outcomes, args.seeds, a, b, **kw) for a, b in v
                       if a in present and b in present} for k, v in pairs.items()}
    choice = choose_on_validation(cells, outcomes, args.seeds, variants, **kw)
    norm = choose_norm(cells, outcomes, args.seeds, **kw)
    agreement = {str(f): judge_agreement(f, args.results, cells, strict) for f in args.reading} or None
    lines = [f"# Powered reproduction: {args.results.name}", "", *settings_lines(cells, args.seeds, strict),
             *variant_table(cells, rows, strict), *frontier_lines(gaps),
             *pair_lines("Sham directions against the real ones", "Real minus sham (random unit directions orthogonal "
                         "to r_l, same norm, alpha and schedule): a difference is what the refusal direction adds.",
                         comparisons["sham"]),
             *pair_lines("Band norm against l1", "Band minus l1 (the penalty is zero within a band around the anchor, "
                         "so its gradient there is zero).", comparisons["band"]),
             *pair_lines("ProCon against the same data without it", "ProCon minus IFT or IFT_safe at lr 1e-3: not "
                         "budget-matched (the frontier above is).", comparisons["data"]),
             *choice_lines(choice), *norm_lines(norm),
             "## Judge against a human reading", "", *agreement_markdown(agreement, strict), "",
             *missing_lines(rows, variants, cells, args.seeds), *cell_table(cells, strict)]
    summary = {}
    if args.other_start:
        other_cells = load_cells(args.other_start)
        other_rows = variant_rows(other_cells, args.seeds, variants)
        moves = start_to_start(rows, cells, other_rows, other_cells, args.seeds)
        lines += start_markdown(args.other_start, cells, other_cells, moves)
        summary["other_start"] = {"results": str(args.other_start), "moves": moves}
    (args.results / "table.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    write_json(args.results / "summary.json", {
        "code_version": next(iter(cells.values()))["code_version"], "judge": "strict" if strict else "substring",
        "default_variant": DEFAULT_VARIANT, "variants": rows, "frontier": gaps, "comparisons": comparisons,
        "chosen_on_validation": choice, "norm_chosen": norm, "judge_agreement": agreement, "cells": sorted(cells),
        **summary})
    frontier_plot(args.results / "frontier.png", cells, args.seeds, present,
                  "strict judge" if strict else "substring rule")
    drift_plots(args.results, cells, present, args.seeds)
    print((args.results / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
