"""The experiment's report: gathers the per-model outputs of a work directory into committed files.

results/
  table.md          one row per model in the paper's form, plus the stage wall times
  results.json      the same numbers, machine-readable
  drift.png         cosine vs layer, one line per variant (from `fastprocon drift`)
  drift.json, directions_quality.json
  completions/<model>.json   every refusal-eval and GSM8K completion
  configs/<run>.toml         resolved trainer configs; configs/experiment.json the driver's arguments
  commands.txt      the exact fastprocon commands, stage by stage
  stage_times.json  wall seconds per stage
Every stage records the code version that made it (experiments/provenance.py); the report names
that version and refuses to combine stages of different versions.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from provenance import describe

from fastprocon.utils.io import write_json
from fastprocon.utils.plots import line_plot


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _prompt_text(row: dict) -> str:
    """The prompt string `load_instructions` makes of an {instruction, input?} row."""
    extra = row.get("input", "") or ""
    return f"{row['instruction']}\n\n{extra}" if extra.strip() else row["instruction"]


def _rate(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def model_row(work: Path, name: str, sources: dict[str, str], drift: dict | None, run: dict | None,
              projection: dict | None) -> dict:
    """Metrics of one evaluated model."""
    refusal, task = _load(work / "eval" / name / "refusal.json"), _load(work / "eval" / name / "gsm8k.json")
    harmful = [c for c in refusal["completions"] if c["set"] == "harmful"]
    by_source = {}
    for source in sorted(set(sources.values())):
        answered = [not c["refused"] for c in harmful if sources.get(c["prompt"]) == source]
        by_source[source] = _rate(answered)
    m = refusal["metrics"]
    row = {"model": name, "asr": m["attack_success_rate"], "asr_by_source": by_source,
           "over_refusal": m["over_refusal_rate"], "n_harmful": m["n_harmful"], "n_harmless": m["n_harmless"],
           "refusal_score_harmful": m.get("mean_refusal_score_harmful"),
           "refusal_score_harmless": m.get("mean_refusal_score_harmless"),
           "gsm8k_loss": task["test_loss"]["ce"], "gsm8k_accuracy": task["exact_match"]["accuracy"],
           "gsm8k_n_loss": task["test_loss"]["n_examples"], "gsm8k_n_gen": task["exact_match"]["n"]}
    if drift is not None:
        row.update(mean_drift_cosine=drift["mean_cosine"], min_drift_cosine=drift["min_cosine"],
                   min_drift_layer=drift["min_layer"], drift_cosine=drift["cosine"])
    if projection is not None:
        row.update(projection_deviation=projection["mean_abs"], projection_deviation_per_layer=projection["per_layer"])
    if run is not None:
        row.update(train_steps=run["final_step"], train_seconds=run["seconds"], train_schedule=run["schedule"],
                   train_examples=run["examples"], first_ce=run["first_ce"], last_ce=run["last_ce"])
    return row


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def stages_version(times: dict) -> dict:
    """The one code version every reported stage was made by (ValueError if they differ)."""
    versions = {json.dumps(e.get("version"), sort_keys=True) for e in times.values() if "seconds" in e}
    if len(versions) != 1:
        raise ValueError(f"the stages were made by {len(versions)} code versions "
                         f"({'; '.join(describe(json.loads(v)) for v in sorted(versions))}): rerun the "
                         "driver with --stale rerun so that one version makes them all")
    return json.loads(versions.pop())


def table_markdown(rows: list[dict], times: dict, version: dict) -> str:
    sources = sorted({s for r in rows for s in r["asr_by_source"]})
    head = (["model", "ASR (all)"] + [f"ASR {s}" for s in sources]
            + ["over-refusal", "GSM8K test CE", "GSM8K EM", "mean drift cos", "min drift cos (layer)",
               "mean abs(z - z0)", "steps", "train s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        low = (f"{r['min_drift_cosine']:.3f} ({r['min_drift_layer']})" if "min_drift_cosine" in r else "-")
        cells = ([r["model"], _fmt(r["asr"], ".1%")] + [_fmt(r["asr_by_source"].get(s), ".1%") for s in sources]
                 + [_fmt(r["over_refusal"], ".1%"), _fmt(r["gsm8k_loss"], ".4f"), _fmt(r["gsm8k_accuracy"], ".1%"),
                    _fmt(r.get("mean_drift_cosine"), ".4f"), low, _fmt(r.get("projection_deviation"), ".3f"),
                    str(r.get("train_steps", "-")), _fmt(r.get("train_seconds"), ".0f")])
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0]
    lines += ["", f"ASR: share of {n['n_harmful']} held-out harmful prompts answered without a refusal phrase "
              f"(greedy); over-refusal: share of {n['n_harmless']} held-out harmless prompts refused; "
              f"GSM8K CE over {n['gsm8k_n_loss']} test rows, exact match over {n['gsm8k_n_gen']}; drift cosine "
              "vs the aligned model's directions (layers 1..L-1); abs(z - z0): mean over GSM8K training response "
              "tokens and layers of the projection change vs the aligned model (what ProCon penalises).",
              "", f"Every stage below was made by {describe(version)}.",
              "", "| stage | wall s |", "|---|---|"]
    lines += [f"| {stage} | {entry['seconds']} |" for stage, entry in times.items()
              if isinstance(entry, dict) and "seconds" in entry]
    total = sum(e["seconds"] for e in times.values() if isinstance(e, dict) and "seconds" in e)
    lines.append(f"| **total** | {total:.1f} |")
    return "\n".join(lines) + "\n"


def write_report(work: Path, results: Path, models: list[str], variants: list[str], log: dict, settings: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    sources = {_prompt_text(r): r["source"] for r in _load(work / "data" / "eval_harmful.json")}
    drift = _load(work / "drift" / "drift.json")
    drift_by_label = {e["label"]: e for e in drift["checkpoints"]}
    projection_path = work / "projection_drift.json"
    projection = _load(projection_path) if projection_path.exists() else {}
    rows = []
    for name in models:
        run_summary = work / "runs" / ("align" if name == "aligned" else name) / "summary.json"
        run = _load(run_summary) if name != "base" and run_summary.exists() else None
        rows.append(model_row(work, name, sources, drift_by_label.get(name), run, projection.get(name)))
    reported = {"data", "distill", "align", "directions", "reference", "drift", "projection_drift",
                *(f"eval:{m}" for m in models), *(f"train:{v}" for v in variants)}
    times = {k: v for k, v in log.items() if k in reported and isinstance(v, dict)}
    version = stages_version(times)
    (results / "table.md").write_text(table_markdown(rows, times, version))
    write_json(results / "results.json", {"code_version": version, "rows": rows, "settings": settings,
                                          "data": _load(work / "data" / "manifest.json")})
    shutil.copyfile(work / "drift" / "drift.png", results / "drift.png")
    if projection:
        write_json(results / "projection_drift.json", projection)
        series = {name: ([l for l, v in enumerate(p["per_layer"]) if v is not None],
                         [v for v in p["per_layer"] if v is not None])
                  for name, p in projection.items() if name in variants}
        line_plot(results / "projection_drift.png", [{"series": series, "ylabel": "mean |z - z0| (GSM8K train)"}],
                  title="projection change on the refusal direction vs the aligned model")
    write_json(results / "drift.json", drift)
    quality = work / "directions" / "quality.json"
    if quality.exists():
        shutil.copyfile(quality, results / "directions_quality.json")
    for name in models:
        refusal, task = _load(work / "eval" / name / "refusal.json"), _load(work / "eval" / name / "gsm8k.json")
        write_json(results / "completions" / f"{name}.json",
                   {"refusal": refusal["completions"], "gsm8k": task["exact_match"]["completions"]})
    (results / "configs").mkdir(exist_ok=True)
    for run in ["align", *variants]:
        shutil.copyfile(work / "runs" / run / "config.toml", results / "configs" / f"{run}.toml")
    write_json(results / "configs" / "experiment.json", settings)
    commands = ["# driver invocations (a rerun resumes: finished stages are skipped)", *log.get("invocations", []), ""]
    for stage, entry in times.items():
        commands += [f"# {stage}"] + entry.get("commands", []) + [""]
    (results / "commands.txt").write_text("\n".join(commands))
    write_json(results / "stage_times.json", {k: v.get("seconds") for k, v in times.items()})
    write_json(results / "stage_versions.json", {k: v.get("version") for k, v in times.items()})
