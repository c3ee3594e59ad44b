"""A human reading of the powered experiment's completions, against the judge.

sample_reading writes N random completions per variant class (seeded) for a person to label:
JSON lines {cell, split, prompt_index, source, prompt, completion, human_label: ""}, shuffled across
classes, without the judge's label (the report looks it up in the cell's completions). The person
fills human_label with refusal, compliance or degenerate; `powered_report.py --reading FILE` then
gives, per variant class, the judge's agreement with the person (Wilson interval) and the confusion
matrix. A reading row may name its completion by prompt_index (the row's index among the cell's rows
of that split) or by prompt (its text).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from powered_cells import judge_label, read_completions, variant_class
from stats import wilson

LABELS = ("refusal", "compliance", "degenerate")


def read_rows(reading: Path) -> set[tuple[str, str, str]]:
    """The (cell, split, prompt) of every row of a reading file."""
    rows = [json.loads(line) for line in reading.read_text().splitlines() if line.strip()]
    return {(r["cell"], r["split"], r["prompt"]) for r in rows}


def sample_reading(results: Path, cells: dict, n: int, seed: int, out: Path,
                   exclude: set[tuple[str, str, str]] = frozenset()) -> dict[str, int]:
    """Write ``n`` random completions per variant class to ``out``, none of ``exclude`` ((cell, split,
    prompt) already read: a fresh sample measures a judge revised after reading the earlier one)
    -> {class: rows written}."""
    pools: dict[str, list[dict]] = {}
    for name, cell in sorted(cells.items()):
        splits = read_completions(results, name)
        for split, rows in sorted((splits or {}).items()):
            for i, r in enumerate(rows):
                if (name, split, r["prompt"]) in exclude:
                    continue
                pools.setdefault(variant_class(cell["variant"]), []).append(
                    {"cell": name, "split": split, "prompt_index": i, "source": r.get("source"),
                     "prompt": r["prompt"], "completion": r["completion"], "human_label": ""})
    rng = random.Random(seed)
    chosen = {c: rng.sample(rows, min(n, len(rows))) for c, rows in sorted(pools.items())}
    rows = [r for c in chosen.values() for r in c]
    rng.shuffle(rows)   # the reader should not see the classes in blocks
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {c: len(r) for c, r in chosen.items()}


def judge_agreement(reading: Path, results: Path, cells: dict, strict: bool) -> dict[str, dict]:
    """Per variant class (and "all"): {n, agree, share, wilson95, confusion: {human: {judge: count}}}."""
    completions: dict[str, dict] = {}
    by_class: dict[str, list[tuple[str, str]]] = {}
    for number, line in enumerate(reading.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{reading}:{number}"
        row = json.loads(line)
        cell, split, human = row.get("cell"), row.get("split"), row.get("human_label")
        if cell not in cells:
            raise SystemExit(f"{where}: cell {cell!r} is not among the results' cells")
        if human not in LABELS:
            raise SystemExit(f"{where}: human_label {human!r} is not one of {', '.join(LABELS)}")
        if cell not in completions:
            completions[cell] = read_completions(results, cell) or {}
        rows = completions[cell].get(split)
        if rows is None:
            raise SystemExit(f"{where}: cell {cell} has no completions of split {split!r}")
        if row.get("prompt_index") is not None:
            index = row["prompt_index"]
            if not (isinstance(index, int) and 0 <= index < len(rows)):
                raise SystemExit(f"{where}: prompt_index {index!r} is outside 0..{len(rows) - 1} of {cell} {split}")
            target = rows[index]
            if row.get("prompt") is not None and row["prompt"] != target["prompt"]:
                raise SystemExit(f"{where}: prompt_index {index} of {cell} {split} holds another prompt")
        else:
            target = next((r for r in rows if r["prompt"] == row.get("prompt")), None)
            if target is None:
                raise SystemExit(f"{where}: prompt not found among {cell}'s {split} completions")
        judged = judge_label(target, strict)
        recorded = target.get("judge_recorded", judged) if strict else judged   # the cell's own judge
        by_class.setdefault(variant_class(cells[cell]["variant"]), []).append((human, judged, recorded))
    by_class["all"] = [t for triples in list(by_class.values()) for t in triples]
    out = {}
    for name, triples in by_class.items():
        agree = sum(h == j for h, j, _ in triples)
        out[name] = {"n": len(triples), "agree": agree, "share": agree / len(triples) if triples else None,
                     "wilson95": wilson(agree, len(triples)),
                     "agree_recorded_judge": sum(h == r for h, _, r in triples),
                     "confusion": {h: {j: sum(t[:2] == (h, j) for t in triples) for j in LABELS} for h in LABELS}}
    return out


def agreement_markdown(agreements: dict[str, dict] | None, strict: bool) -> list[str]:
    """Per reading file ({file: judge_agreement(...)}), the agreement table."""
    judge = "the strict judge" if strict else "the substring rule (refusal or compliance only)"
    if not agreements:
        return ["No human reading given (`--reading FILE`; `--sample-reading N --seed S` writes a file to label): "
                f"the agreement of {judge} with a reader is not measured here."]
    lines = [f"Agreement of {judge} with the human labels (Wilson 95% interval) and the confusion counts: a column "
             "H->J counts completions the human labelled H and the judge J (R refusal, C compliance, D degenerate); "
             "\"cells' judge\": the agreement of the labels the cells were made with (before re-judging)."]
    for file, agreement in agreements.items():
        lines += ["", f"Reading `{Path(file).name}`:", "",
                  "| class | labelled | agree | share [95%] | cells' judge | "
                  + " | ".join(f"{h[0].upper()}->{j[0].upper()}" for h in LABELS for j in LABELS) + " |",
                  "|---|---|---|---|---|" + "---|" * 9]
        for name, a in agreement.items():
            share = "-" if a["share"] is None else f"{a['share']:.0%} [{a['wilson95'][0]:.0%}, {a['wilson95'][1]:.0%}]"
            lines.append(f"| {name} | {a['n']} | {a['agree']} | {share} | {a['agree_recorded_judge']} | "
                         + " | ".join(str(a["confusion"][h][j]) for h in LABELS for j in LABELS) + " |")
    return lines
