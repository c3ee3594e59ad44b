"""Smoke test of experiments/procon_smollm2.py: the whole experiment on the random-init `tiny`
model with micro sizes (two optimizer steps per run), then a rerun that must resume (skip every
stage) and rewrite the same report. Needs ../shared/data."""
import json
import subprocess
import sys

from conftest import REPO

DRIVER = REPO / "experiments" / "procon_smollm2.py"
VARIANTS = ["ift", "ift_safe", "procon_s", "procon_wu", "procon_wu_safe", "procon_s_token", "procon_s_token_huber"]


def run_driver(work, results, data, expect_ok=True):
    cmd = [sys.executable, str(DRIVER), "--model", "tiny", "--sizes", "micro", "--device", "cpu",
           "--data", str(data), "--work", str(work), "--results", str(results), "--no-base-eval",
           "--align", "max_steps=2", "--ift", "max_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    if not expect_ok:
        assert proc.returncode != 0, proc.stdout[-3000:]
        return proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_experiment_end_to_end_on_tiny(tmp_path, shared_data):
    work, results = tmp_path / "work", tmp_path / "results"
    run_driver(work, results, shared_data)

    rows = json.loads((results / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["aligned", *VARIANTS]
    for r in rows:
        for key in ("asr", "over_refusal", "gsm8k_accuracy"):
            assert 0.0 <= r[key] <= 1.0, (r["model"], key, r[key])
        assert r["gsm8k_loss"] > 0
        assert set(r["asr_by_source"]) == {"harmbench_val", "safety_heldout"}
    assert rows[0]["projection_deviation"] == 0.0     # the aligned model against itself
    for r in rows[1:]:
        assert r["train_steps"] == 2
        assert r["projection_deviation"] > 0.0
        assert len(r["drift_cosine"]) == 4 and r["drift_cosine"][0] is None   # tiny: 4 layers, none at layer 0
        assert all(-1.0 <= c <= 1.0 + 1e-6 for c in r["drift_cosine"][1:])

    # each variant ran the schedule variants.toml gives it, from the aligned model
    schedules = {v: json.loads((work / "runs" / v / "summary.json").read_text())["schedule"] for v in VARIANTS}
    assert schedules["ift"].startswith("ProCon off") and schedules["ift_safe"].startswith("ProCon off")
    assert schedules["procon_s"].startswith("ProCon_s") and schedules["procon_wu"].startswith("ProCon_wu")
    assert 'reduction = "token"' in (results / "configs" / "procon_s_token.toml").read_text()
    assert 'norm = "huber"' in (results / "configs" / "procon_s_token_huber.toml").read_text()
    for v in VARIANTS:
        examples = json.loads((work / "runs" / v / "summary.json").read_text())["examples"]
        assert examples == (8 + 4 if v.endswith("_safe") else 8), (v, examples)
        assert f'spec = "{work / "runs" / "align" / "model"}"' in (results / "configs" / f"{v}.toml").read_text()

    # the slices are disjoint: stage-1 safety rows, stage-3 safety rows and held-out eval prompts
    data = {name: json.loads((work / "data" / f"{name}.json").read_text())
            for name in ("align_safety", "ift_safety", "eval_harmful")}
    sets = [{r["instruction"] for r in rows_} for rows_ in data.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])

    commands = (results / "commands.txt").read_text()
    assert commands.count("fastprocon train ") == 1 + len(VARIANTS)
    for sub in ("directions", "reference", "eval-refusal", "drift"):
        assert f"fastprocon {sub} " in commands
    for name in ["aligned", *VARIANTS]:
        completions = json.loads((results / "completions" / f"{name}.json").read_text())
        assert len(completions["refusal"]) == 39 + 4 + 4 and len(completions["gsm8k"]) == 2
    assert (results / "drift.png").stat().st_size > 0 and (results / "projection_drift.png").stat().st_size > 0
    assert "| procon_wu_safe |" in (results / "table.md").read_text()

    # a rerun resumes: every stage is skipped, the stage times are kept
    times = (results / "stage_times.json").read_text()
    out = run_driver(work, results, shared_data)
    assert out.count(": done (") == 5 + len(VARIANTS) + (1 + len(VARIANTS)) + 2, out
    assert "running" not in out
    assert (results / "stage_times.json").read_text() == times

    # provenance: every stage and the report name one code version; a stage made by another
    # version is refused (never silently mixed into the report)
    version = json.loads((results / "results.json").read_text())["code_version"]
    assert len(version["code"]) == 16 and len(version["commit"]) == 40
    versions = json.loads((results / "stage_versions.json").read_text())
    assert all(v == version for k, v in versions.items() if k != "invocations"), versions
    assert f"code {version['code']}" in (results / "table.md").read_text()
    log_path = work / "stages.json"
    log = json.loads(log_path.read_text())
    log["train:procon_s"]["version"] = {**version, "code": "0" * 16}
    log_path.write_text(json.dumps(log))
    err = run_driver(work, results, shared_data, expect_ok=False)
    assert "stage train:procon_s" in err and "0000000000000000" in err and "--stale rerun" in err, err
