"""The powered reproduction (experiments/powered.py, powered_report.py, stats.py): its statistics
against known values, and the driver end to end on the random-init `tiny` model with micro sizes
(two 1-thread workers sharing the cell queue, a resume, a stale cell refused, the report)."""
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import stats  # noqa: E402

DRIVER, REPORT = REPO / "experiments" / "powered.py", REPO / "experiments" / "powered_report.py"


def test_wilson_interval_known_values():
    # hand-computed from the Wilson formula (z = 1.95996)
    low, high = stats.wilson(5, 10)
    assert low == pytest.approx(0.236593, abs=1e-6) and high == pytest.approx(0.763407, abs=1e-6)
    low, high = stats.wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.277533, abs=1e-6)
    low, high = stats.wilson(30, 300)
    assert low == pytest.approx(0.0709479, abs=1e-6) and high == pytest.approx(0.1391665, abs=1e-6)
    assert stats.wilson(0, 0) is None
    with pytest.raises(ValueError, match="successes"):
        stats.wilson(11, 10)


def test_mean_std_recovery_and_welch():
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert stats.mean_std([4.0]) == (4.0, None) and stats.mean_std([]) == (None, None)
    assert stats.recovery(0.6, 0.2, 0.1) == pytest.approx(0.8)
    assert stats.recovery(0.6, 0.7, 0.1) == pytest.approx(-0.2)
    assert stats.recovery(0.1, 0.2, 0.1) is None      # IFT lost nothing: undefined, not 0 or inf
    w = stats.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert w["t"] == pytest.approx(-3.0 / math.sqrt(2 / 3)) and w["df"] == pytest.approx(4.0)   # equal spreads
    assert stats.welch([1.0], [2.0, 3.0]) is None


def _cell(variant, seed, asr_val, refusal_val, ce):
    rates = {"asr_test": asr_val, "asr_val": asr_val, "over_refusal_test": refusal_val, "over_refusal_val": refusal_val}
    return {"variant": variant, "seed": seed, "eval": {**{k: {"rate": v} for k, v in rates.items()},
                                                      "gsm8k_test_ce": {"ce": ce}}, "probes": []}


def test_start_to_start_moves_with_welch_satterthwaite():
    import powered_report as report

    def start(ift_asr, wu_asrs):   # cells without the strict judge: the substring rule's rates
        cells = {"aligned": {**_cell(None, None, 0.08, 0.14, 1.6), "code_version": {"code": "0123", "commit": None}}}
        cells |= {f"ift_s{s}": _cell("ift", s, a, 0.08, 1.2) for s, a in enumerate(ift_asr)}
        cells |= {f"procon_wu_s{s}": _cell("procon_wu", s, a, 0.15, 1.2) for s, a in enumerate(wu_asrs)}
        return cells, report.variant_rows(cells, [0, 1, 2], ["ift", "procon_wu"])

    here, there = start([0.17, 0.18, 0.16], [0.07, 0.08, 0.06]), start([0.17, 0.17], [0.10, 0.09])
    moves = report.start_to_start(here[1], here[0], there[1], there[0], [0, 1, 2])
    asr = moves["procon_wu"]["asr"]
    assert asr["diff"] == pytest.approx(0.07 - 0.095)
    assert asr["welch"] == stats.welch([0.07, 0.08, 0.06], [0.10, 0.09])
    assert asr["welch"]["t"] < -asr["welch"]["t_crit"]                  # moved beyond the seeds
    ift = moves["ift"]["asr"]["welch"]                                     # no spread there: df = here's n - 1
    assert ift["t"] == 0.0 and ift["df"] == 2.0 and ift["p"] == pytest.approx(1.0)
    text = "\n".join(report.start_markdown("v1", here[0], there[0], moves))
    w = asr["welch"]   # s^2/n: 1e-4/3 here, 0.5e-4/2 there
    assert w["t"] == pytest.approx(-0.025 / math.sqrt(1e-4 / 3 + 0.5e-4 / 2))
    assert w["df"] == pytest.approx((1e-4 / 3 + 0.5e-4 / 2) ** 2 / ((1e-4 / 3) ** 2 / 2 + (0.5e-4 / 2) ** 2 / 1))
    assert f"| procon_wu | 7.0% ± 1.0% / 9.5% ± 0.7% | -2.5% (t {w['t']:.2f}, df {w['df']:.1f}, p {w['p']:.3f})" in text
    assert "| aligned | 8.0% / 8.0% | +0.0%" in text


def test_same_run_compares_every_logged_value_but_timings(tmp_path):
    import same_run

    base = [{"step": 10, "ce": 1.5, "probe_drift_cos": [None, 0.99], "tokens_per_s": 40.0}]
    a, b = tmp_path / "a", tmp_path / "b"
    for d, r in ((a, base), (b, [{**base[0], "tokens_per_s": 75.0}])):
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r))
    assert same_run.main([str(a), str(b)]) == 0                     # a timing differs: still the same run
    (b / "metrics.jsonl").write_text(json.dumps({**base[0], "probe_drift_cos": [None, 0.98]}) + "\n")
    assert same_run.first_difference(same_run.rows(a), same_run.rows(b)).startswith("step 10: probe_drift_cos")
    assert same_run.main([str(a), str(b)]) == 1


def test_tensor_digest_ignores_metadata_not_values(tmp_path):
    import torch
    from powered import tensors_sha256
    from safetensors.torch import save_file

    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_file(t, tmp_path / "x.safetensors", metadata={"created": "monday", "model": "/here"})
    save_file(t, tmp_path / "y.safetensors", metadata={"created": "tuesday"})
    save_file({**t, "a": t["a"] + 2 ** -20}, tmp_path / "z.safetensors",
              metadata={"created": "monday", "model": "/here"})
    digest = tensors_sha256(tmp_path / "x.safetensors")
    assert tensors_sha256(tmp_path / "y.safetensors") == digest != tensors_sha256(tmp_path / "z.safetensors")


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def run(script, *args, expect_ok=True, env=None):
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=None if env is None else {**os.environ, **env})
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        assert proc.returncode != 0, proc.stdout[-3000:]
    return proc.stdout + proc.stderr


def test_powered_driver_on_tiny(tmp_path, shared_data):
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--model", "tiny", "--sizes", "micro", "--device", "cpu", "--data", shared_data, "--work", work,
            "--results", results, "--seeds", 0, "--variants", "ift", "procon_wu_safe_sham",
            "--not-instructions", tmp_path / "removed.json", "--align", "max_steps=2", "--ift", "max_steps=3",
            "--workers", 2]
    # the harmful sets lose the prompts the --not-instructions file lists (here: the first test prompt)
    from powered import PoweredExperiment, parse_args
    slices = PoweredExperiment(parse_args([*map(str, args[:4]), "--data", str(shared_data), "--work",
                                           str(tmp_path / "slices")]))
    slices.data_dir.mkdir(parents=True)
    slices.make_data()   # the driver's data stage makes the same seeded slices
    first = json.loads((slices.data_dir / "harmful_test.json").read_text())[0]["instruction"]
    (tmp_path / "removed.json").write_text(json.dumps({"rule": "test", "removed": [first]}))
    results.mkdir()
    subprocess.run(["git", "init", "-q", results], check=True)
    run(DRIVER, *args, "--commit", env=GIT_IDENTITY)
    # --commit: each cell at once, with the stage-1 record every cell starts from
    log = subprocess.run(["git", "-C", results, "log", "--format=%s", "--name-only"], capture_output=True,
                         text=True, check=True).stdout
    assert log.count("powered (results): cell ") == 3 and "shared_stages.json" in log
    assert "procon_wu_safe_sham_s0.jsonl" in log
    cells = {p.stem: json.loads(p.read_text()) for p in (results / "cells").glob("*.json")}
    assert set(cells) == {"aligned", "ift_s0", "procon_wu_safe_sham_s0"}
    for name, cell in cells.items():
        ev = cell["eval"]
        assert (ev["asr_test"]["n"], ev["asr_val"]["n"], ev["over_refusal_test"]["n"]) == (5, 4, 4)
        assert ev["removed_not_instructions"] == 1
        low, high = ev["asr_test"]["wilson95"]
        assert low <= ev["asr_test"]["rate"] <= high
        strict = [ev[f"strict_{label}_harmful_test"] for label in ("refusal", "compliance", "degenerate")]
        assert sum(x["count"] for x in strict) == 5 and all(x["n"] == 5 for x in strict)
        assert ev["gsm8k_test_ce"]["n_examples"] == 4 and ev["gsm8k_test_ce"]["ce"] > 0
        lines = [json.loads(x) for x in (results / "completions" / f"{name}.jsonl").read_text().splitlines()]
        assert len(lines) == 5 + 4 + 4 + 4 and first not in {x["prompt"] for x in lines}
        assert {x["judge"] for x in lines} <= {"refusal", "compliance", "degenerate"}
    trained = cells["procon_wu_safe_sham_s0"]
    assert trained["train"]["final_step"] == 3 and trained["train"]["examples"] == 4 + 2   # GSM8K + safety mix
    assert "lora = true" in trained["config"] and "sham_s0.safetensors" in trained["config"]
    # the sham directions: unit vectors orthogonal to the real ones, the seed's
    from fastprocon.refusal.directions import load_directions
    real = load_directions(work / "directions" / "directions.safetensors")
    sham = load_directions(work / "directions" / "sham_s0.safetensors")
    assert sham.metadata["sham"]["seed"] == 0 and sham.defined_layers == real.defined_layers
    assert float((sham.directions * real.directions).sum(-1).abs().max()) < 1e-5
    assert [p["step"] for p in trained["probes"]] == [0, 3]            # live probe: start and end
    assert not (work / "runs" / "ift_s0" / "model").exists()          # exported model removed after its eval

    # evaluation prompts are used nowhere in training or direction extraction
    data = {p.stem: json.loads(p.read_text()) for p in (work / "data").glob("*.json") if p.stem != "manifest"}
    evaluated = {r["instruction"] for k in ("harmful_test", "harmful_val", "harmless_test", "harmless_val")
                 for r in data[k]}
    used = {r["instruction"] for k in ("align_safety", "ift_safety", "harmful_dir", "harmless_dir",
                                       "distill_prompts") for r in data[k]}
    assert evaluated and not (evaluated & used)
    assert not ({r["instruction"] for r in data["harmful_test"]} & {r["instruction"] for r in data["harmful_val"]})

    # a rerun resumes: no cell is redone
    out = run(DRIVER, *args[:-2])
    assert "[powered] cell" not in out

    # stage 1 is reproducible: shared stages made again from scratch in another --work directory give
    # the same files (tensors by content; paths and creation times aside), so no cell is redone
    shared = json.loads((results / "shared_stages.json").read_text())
    assert shared["distill"]["threads"] == shared["directions"]["threads"] == 1
    assert set(shared["digests"]) == {"data", "aligned", "directions", "reference"}
    out = run(DRIVER, *[tmp_path / "work2" if a == work else a for a in args[:-2]])
    assert "[powered] cell" not in out and "align: running" in out
    assert json.loads((results / "shared_stages.json").read_text())["digests"] == shared["digests"]

    # shared stages that made other files than the committed cells started from stop the run
    (results / "shared_stages.json").write_text(json.dumps({**shared, "digests": {**shared["digests"],
                                                                                   "aligned": "0" * 16}}))
    err = run(DRIVER, *args[:-2], expect_ok=False)
    assert "aligned" in err and "other files" in err and "--stale rerun" in err
    (results / "shared_stages.json").write_text(json.dumps(shared))

    # a cell made from other inputs (e.g. another aligned model) is refused, naming the cell
    path = results / "cells" / "ift_s0.json"
    cell = json.loads(path.read_text())
    path.write_text(json.dumps({**cell, "inputs": "0" * 16}))
    err = run(DRIVER, *args[:-2], expect_ok=False)
    assert "cell ift_s0" in err and "0000000000000000" in err and "--stale rerun" in err
    path.write_text(json.dumps(cell))

    # the report marks missing cells and names the code version
    out = run(REPORT, "--results", results, "--seeds", 0, 1, "--variants", "ift", "procon_wu_safe_sham",
              "--other-start", results)
    table = (results / "table.md").read_text()
    assert "ift_s1" in table.split("## Missing cells")[1] and cell["code_version"]["code"] in table
    assert "Another start" in table and "| ift | " in table.split("Another start")[1]   # here: against itself
    for png in ("frontier.png", "drift_layers.png", "drift_steps.png"):
        assert (results / png).stat().st_size > 0
