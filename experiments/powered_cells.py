"""The powered experiment's cells as the report reads them: which judge scored them, each metric per
cell, the per-prompt outcomes behind the rates (for the bootstrap), the variant families.

Metrics (names used across the report):
  asr                    share of harmful test prompts answered: the strict judge's "compliance"
                         (cells without the strict judge: the substring rule, no refusal phrase)
  over_refusal           share of harmless test prompts refused (strict "refusal"; or the substring rule)
  asr_val, over_refusal_val    the same on the validation split
  degenerate_harmful, degenerate_harmless   strict "degenerate" share on the test prompts (strict only)
  asr_substring, over_refusal_substring     the paper's substring rule on the test prompts, for comparison
  ce                     GSM8K test cross-entropy
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from stats import wilson

from fastprocon.refusal.judge import judge

V2_VARIANTS = ("ift", "ift_safe", "procon_s", "procon_wu", "procon_wu_safe", "procon_s_token", "procon_wu_safe_token")
V3_VARIANTS = ("ift_lr2e-4", "ift_lr5e-4", "ift", "ift_safe_lr2e-4", "ift_safe_lr5e-4", "ift_safe",
               "procon_s", "procon_wu", "procon_wu_sham", "procon_wu_band",
               "procon_wu_safe", "procon_wu_safe_sham", "procon_wu_safe_band")
ALIGNED = "aligned"   # the stage-1 model's cell: the start of every stage-3 variant
# baseline lines of the frontier, in learning-rate order (ift and ift_safe run at the driver's lr 1e-3)
FAMILIES = {"ift": ("ift_lr2e-4", "ift_lr5e-4", "ift"), "ift_safe": ("ift_safe_lr2e-4", "ift_safe_lr5e-4", "ift_safe")}
STRICT = {"asr": "strict_compliance_harmful_test", "over_refusal": "strict_refusal_harmless_test",
          "asr_val": "strict_compliance_harmful_val", "over_refusal_val": "strict_refusal_harmless_val",
          "degenerate_harmful": "strict_degenerate_harmful_test",
          "degenerate_harmless": "strict_degenerate_harmless_test",
          "asr_substring": "asr_test", "over_refusal_substring": "over_refusal_test"}
SUBSTRING = {"asr": "asr_test", "over_refusal": "over_refusal_test", "asr_val": "asr_val",
             "over_refusal_val": "over_refusal_val", "asr_substring": "asr_test",
             "over_refusal_substring": "over_refusal_test"}
# metric -> (completions split, strict label counted); substring metrics count `refused` instead
OUTCOMES = {"asr": ("harmful_test", "compliance"), "over_refusal": ("harmless_test", "refusal"),
            "asr_val": ("harmful_val", "compliance"), "over_refusal_val": ("harmless_val", "refusal"),
            "degenerate_harmful": ("harmful_test", "degenerate"),
            "degenerate_harmless": ("harmless_test", "degenerate"),
            "asr_substring": ("harmful_test", "compliance"), "over_refusal_substring": ("harmless_test", "refusal")}


def load_cells(results: Path) -> dict[str, dict]:
    """The cells of ``results``, their strict metrics re-judged (:func:`rejudge`)."""
    cells = {p.stem: json.loads(p.read_text()) for p in sorted((results / "cells").glob("*.json"))}
    versions = {c["code_version"]["code"] for c in cells.values()}
    if len(versions) > 1:
        raise SystemExit(f"cells from {len(versions)} code versions ({', '.join(sorted(versions))}): "
                         "rerun the stale ones (powered.py --stale rerun) before reporting")
    for name, cell in cells.items():
        rejudge(results, name, cell)
    return cells


def rejudge(results: Path, name: str, cell: dict) -> None:
    """Score the cell's stored completions with the current strict judge, in place.

    The judge is read-only over text, so its rules can improve after a cell ran without rerunning it.
    The labels the cell was made with must first reproduce its recorded counts (else the completions
    file is not the cell's: refused); then each strict metric's count, rate and Wilson interval are
    replaced, the recorded ones kept as ``cell["eval"]["recorded_judge"]`` and the changed labels
    counted in ``cell["eval"]["rejudged"]`` ({split: {"old->new": count}})."""
    splits = read_completions(results, name)
    if splits is None or STRICT["asr"] not in cell["eval"]:
        return
    recorded, changed = {}, {}
    for m, key in STRICT.items():
        split, label = OUTCOMES[m]
        if m.endswith("_substring") or split not in splits:
            continue
        rows = splits[split]
        old = cell["eval"][key]
        if (sum(r["judge_recorded"] == label for r in rows), len(rows)) != (old["count"], old["n"]):
            raise SystemExit(f"{results / 'completions' / name}.jsonl: its {split} labels do not give the cell's "
                             f"recorded {key} ({old['count']} of {old['n']}): not this cell's completions")
        count = sum(r["judge"] == label for r in rows)
        recorded[key] = old
        cell["eval"][key] = {**old, "count": count, "rate": count / len(rows),
                             "wilson95": list(wilson(count, len(rows)) or ())}
    for split, rows in splits.items():
        moves = [f"{r['judge_recorded']}->{r['judge']}" for r in rows if r["judge"] != r["judge_recorded"]]
        changed[split] = {m: moves.count(m) for m in sorted(set(moves))}
    cell["eval"]["recorded_judge"], cell["eval"]["rejudged"] = recorded, changed


def is_strict(cells: dict) -> bool:
    """True when every cell has the strict judge's metrics, False when none has; a mix is refused."""
    strict = {name: STRICT["asr"] in c["eval"] for name, c in cells.items()}
    if len(set(strict.values())) > 1:
        raise SystemExit("some cells have the strict judge's metrics and some do not ("
                         + ", ".join(n for n, s in strict.items() if not s) + " lack them): one table, one judge")
    return all(strict.values()) if strict else False


def metric(cell: dict, name: str) -> float | None:
    """The cell's value of ``name`` (see the module docstring); None when its judge has no such metric."""
    if name == "ce":
        return cell["eval"]["gsm8k_test_ce"]["ce"]
    key = (STRICT if STRICT["asr"] in cell["eval"] else SUBSTRING).get(name)
    return None if key is None else cell["eval"][key]["rate"]


def interval(cell: dict, name: str) -> tuple[float, float] | None:
    """The Wilson 95% interval the cell records for ``name``'s share."""
    key = (STRICT if STRICT["asr"] in cell["eval"] else SUBSTRING).get(name)
    return None if key is None else tuple(cell["eval"][key]["wilson95"])


def cell_names(cells: dict, variant: str, seeds: list[int]) -> list[str]:
    """``variant``'s cells among ``seeds``; the aligned model is one cell (ALIGNED) whatever the seeds."""
    if variant == ALIGNED:
        return [ALIGNED] if ALIGNED in cells else []
    return [f"{variant}_s{s}" for s in seeds if f"{variant}_s{s}" in cells]


def seed_values(cells: dict, variant: str, seeds: list[int], name: str) -> list[float]:
    """``metric(name)`` of each of ``variant``'s cells that exists, in seed order."""
    return [metric(cells[c], name) for c in cell_names(cells, variant, seeds)]


def family(variant: str) -> str:
    """The baseline line a variant is compared with: the one with the same safety data."""
    return "ift_safe" if "_safe" in variant else "ift"


def variant_class(variant: str | None) -> str:
    """Reading classes: ift (any lr), ift_safe (any lr), procon (the paper's rows), sham, band; the
    aligned and base cells are their own."""
    if variant is None:
        return "aligned/base"
    for word in ("sham", "band"):
        if word in variant:
            return word
    if variant.startswith("ift_safe"):
        return "ift_safe"
    return "ift" if variant.startswith("ift") else "procon"


def judge_label(row: dict, strict: bool) -> str:
    """The label of one completion: the strict judge's, or the substring rule's (refusal / compliance)."""
    if strict:
        return row["judge"]
    return "refusal" if row["refused"] else "compliance"


def read_completions(results: Path, cell: str) -> dict[str, list[dict]] | None:
    """The cell's completion rows by split, in file order; None when the file is missing. Rows with a
    strict label are re-judged: ``judge`` / ``judge_reason`` are the current judge's, the stored ones
    move to ``judge_recorded`` / ``judge_reason_recorded``. Read and judged once per file version
    (cached: callers must not modify the rows)."""
    path = results / "completions" / f"{cell}.jsonl"
    if not path.exists():
        return None
    stat = path.stat()
    return _judged_completions(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _judged_completions(path: Path, mtime_ns: int, size: int) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "judge" in row:
            verdict = judge(row["completion"])
            row["judge_recorded"], row["judge_reason_recorded"] = row["judge"], row.get("judge_reason")
            row["judge"], row["judge_reason"] = verdict.label, verdict.reason
        splits.setdefault(row["split"], []).append(row)
    return splits


def load_outcomes(results: Path, cells: dict, strict: bool) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """Per cell with a completions file, per metric: (split, [0/1 per prompt]). Every cell must hold the
    same prompts in the same order per split (the bootstrap resamples prompt indices jointly), and the
    counts must match the cell's JSON; anything else stops the report, naming the cell."""
    out, prompts = {}, {}
    for name, cell in cells.items():
        splits = read_completions(results, name)
        if splits is None:
            continue
        out[name] = {}
        for split, rows in splits.items():
            order = [r["prompt"] for r in rows]
            if prompts.setdefault(split, (name, order))[1] != order:
                raise SystemExit(f"completions of {name} and {prompts[split][0]} hold different {split} prompts "
                                 "(or another order): the prompt bootstrap needs the same prompts in every cell")
        for m, (split, label) in OUTCOMES.items():
            key = (STRICT if strict else SUBSTRING).get(m)
            if key is None or split not in splits:
                continue
            use_judge = strict and not m.endswith("_substring")
            hits = [int((judge_label(r, True) if use_judge else judge_label(r, False)) == label)
                    for r in splits[split]]
            recorded = cell["eval"][key]
            if (sum(hits), len(hits)) != (recorded["count"], recorded["n"]):
                raise SystemExit(f"{results / 'completions' / name}.jsonl: {m} counts {sum(hits)} of {len(hits)} "
                                 f"{split} prompts, the cell records {recorded['count']} of {recorded['n']}")
            out[name][m] = (split, hits)
    return out


def samples(cells: dict, outcomes: dict, variant: str, seeds: list[int], metrics: list[str]) -> list[dict] | None:
    """Bootstrap input of one variant: per cell {metric: (split, outcomes) or the CE}; None when a cell
    lacks the per-prompt outcomes of a rate metric."""
    out = []
    for name in cell_names(cells, variant, seeds):
        entry = {}
        for m in metrics:
            if m == "ce":
                entry[m] = metric(cells[name], "ce")
            elif m in outcomes.get(name, {}):
                entry[m] = outcomes[name][m]
            else:
                return None
        out.append(entry)
    return out or None
