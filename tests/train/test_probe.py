"""The live safety probe (train/probe.py) and the dashboard on the tiny model: its values equal
what eval-refusal's score, `drift` and the reference cache give for the same checkpoint; probes
leave the training losses bitwise unchanged; a resumed run continues the probe series; 2
processes log the same probe values as 1; the refusal guard warns and stops; `fastprocon report`."""
import json
import sys
from pathlib import Path

import pytest
import torch

import fastprocon.train.trainer as trainer_module
from fastprocon.cli import main
from fastprocon.train import Trainer, load_config, train
from fastprocon.train.dashboard import split_records
from fastprocon.train.metrics import read_metrics
from fastprocon.train.probe import DIRECTIONS_FILE, SHARE_KEY, Z0_FILE, equal_shard, probe_due

COMPARED = ("step", "ce", "procon", "alpha", "lr", "grad_norm")
PROBE_KEYS = (SHARE_KEY, "probe_refusal_score_harmful", "probe_refusal_score_harmless", "probe_drift_cos",
              "probe_projection_deviation")


def overrides(run_dir, *extra, assets=None, probe=True):
    items = [f"run_dir={run_dir}", "max_steps=4", "log_every=1", "checkpoint_every=2", "export=false"]
    if probe:
        items += ["safety_probe_every=2", "probe_samples=5", "probe_batch_size=4"]
    if assets is not None:
        items += [f"procon.directions={assets / 'directions.safetensors'}",
                  f"procon.reference_cache={assets / 'reference.safetensors'}"]
    return items + list(extra)


def probe_lines(run_dir):
    return split_records(read_metrics(run_dir))[1]


def train_lines(run_dir):
    return [{k: r[k] for k in COMPARED} for r in split_records(read_metrics(run_dir))[0]]


@pytest.fixture
def no_dashboard(monkeypatch):
    """Skip the end-of-run drawing (seconds of matplotlib) in runs whose test does not look at it."""
    monkeypatch.setattr(trainer_module, "draw_dashboard", lambda run_dir: Path(run_dir) / "dashboard.png")


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """4 steps of ProCon_s on tiny with the probe every 2 steps (0, 2, 4), exported."""
    run_dir = tmp_path_factory.mktemp("probe")
    result = train(load_config("tiny", overrides(run_dir, "export=true")))
    assert result.final_step == 4 and result.stopped is None
    return run_dir


def test_probe_schedule_and_shards():
    assert [s for s in range(11) if probe_due(s, 4, 10)] == [0, 4, 8, 10]
    assert not any(probe_due(s, 0, 10) for s in range(11))
    shards = [equal_shard(5, r, 3) for r in range(3)]
    assert shards == [([0, 1], 2), ([2, 3], 2), ([4, 0], 1)]
    assert equal_shard(1, 1, 2) == ([0], 0)


def test_probe_lines_and_run_directory(probe_run):
    lines = probe_lines(probe_run)
    assert [r["step"] for r in lines] == [0, 2, 4]
    first = lines[0]
    assert all(c is None or c == pytest.approx(1.0, abs=1e-6) for c in first["probe_drift_cos"])
    assert first["probe_drift_cos"][0] is None                       # layer 0 has no direction
    assert first["probe_projection_deviation"] == [None, 0.0, 0.0, 0.0]   # ProCon's layers 1..3; z0 is step 0
    last = lines[-1]
    assert last["probe_drift_cos_min"] < 0.9999 and last["probe_projection_deviation_mean"] > 0   # it moved
    assert all(0 <= r[SHARE_KEY] <= 1 and r["probe_seconds"] > 0 for r in lines)
    assert train_lines(probe_run)[-1]["step"] == 4
    for name in (DIRECTIONS_FILE, Z0_FILE, "dashboard.png"):
        assert (probe_run / name).is_file(), name
    assert (probe_run / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((probe_run / "summary.json").read_text())["probe_seconds"] > 0


def test_probe_equals_eval_refusal_drift_and_the_reference_cache(probe_run, tmp_path):
    """Step 4's probe values against the tools run on the exported step-4 model."""
    last = probe_lines(probe_run)[-1]
    # eval-refusal: default prompt sets are the probe's defaults; the score is the first generated position's
    assert main(["eval-refusal", "--model", str(probe_run / "model"), "--max-new-tokens", "1",
                 "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    m = report["metrics"]
    assert last["probe_refusal_score_harmful"] == pytest.approx(m["mean_refusal_score_harmful"], abs=1e-4)
    assert last["probe_refusal_score_harmless"] == pytest.approx(m["mean_refusal_score_harmless"], abs=1e-4)
    harmful = [row["refusal_score"] for row in report["completions"] if row["set"] == "harmful"]
    assert last[SHARE_KEY] == sum(s > 0 for s in harmful) / len(harmful)
    # drift against the probe's step-0 directions, re-extracted by `fastprocon drift`
    assert main(["drift", "--directions", str(probe_run / DIRECTIONS_FILE), "--checkpoints", str(probe_run / "model"),
                 "--out", str(tmp_path / "drift")]) == 0
    cos = json.loads((tmp_path / "drift" / "drift.json").read_text())["checkpoints"][0]["cosine"]
    assert [c is None for c in cos] == [c is None for c in last["probe_drift_cos"]]
    assert [c for c in last["probe_drift_cos"] if c is not None] == pytest.approx([c for c in cos if c is not None],
                                                                                  abs=1e-5)
    # projection deviation against the trainer's own reference cache (z0 of the initial model)
    from fastprocon.models.load import load_model
    from fastprocon.procon.reference import ReferenceCache, compute_projections
    from fastprocon.refusal.directions import load_directions
    from fastprocon.train.prepare import load_training_data
    loaded = load_model(str(probe_run / "model"))
    cache = ReferenceCache.load(probe_run / "reference.safetensors", model_fingerprint=None, directions_hash=None,
                                dataset_hash=None, max_length=None, layers=None)
    data = load_training_data(load_config(str(probe_run / "config.toml")), loaded.tokenizer)
    ids, pieces = compute_projections(loaded, load_directions(probe_run / "directions.safetensors"),
                                      data.examples[:5], cache.layers, batch_size=16)
    labels = {ex.id: torch.tensor(ex.labels)[None] for ex in data.examples}
    total, count = torch.zeros(len(cache.layers), dtype=torch.float64), 0
    for sample_id, z in zip(ids, pieces):
        lab = labels[sample_id]
        z0 = cache.gather([sample_id], lab)[:, 0, lab[0] != -100]
        total += (z - z0).abs().double().sum(dim=1)
        count += z.shape[1]
    want = (total / count).tolist()
    assert last["probe_projection_deviation"][1:] == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_probes_do_not_change_training(probe_run, tmp_path, capsys, no_dashboard):
    result = train(load_config("tiny", overrides(tmp_path, assets=probe_run, probe=False)))
    assert result.final_step == 4 and probe_lines(tmp_path) == []
    assert train_lines(tmp_path) == train_lines(probe_run)   # bitwise equal on CPU fp32
    # resumed with the probe on: it has no step-0 state to compare with, and says so
    train(load_config("tiny", overrides(tmp_path, "max_steps=6", assets=probe_run)))
    assert "safety probe off for this run" in capsys.readouterr().out
    assert probe_lines(tmp_path) == []


def test_resume_continues_the_probe_series(probe_run, tmp_path, monkeypatch, no_dashboard):
    original = Trainer.step

    def crash_at_step_4(self, step):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step)

    monkeypatch.setattr(Trainer, "step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(load_config("tiny", overrides(tmp_path, assets=probe_run)))
    assert [r["step"] for r in probe_lines(tmp_path)] == [0, 2]
    monkeypatch.setattr(Trainer, "step", original)
    result = train(load_config("tiny", overrides(tmp_path, assets=probe_run)))
    assert result.start_step == 2
    got, want = probe_lines(tmp_path), probe_lines(probe_run)
    assert [r["step"] for r in got] == [0, 2, 4]
    for g, w in zip(got, want):
        for key in PROBE_KEYS:
            assert g[key] == w[key], (key, g["step"])   # bitwise: same weights, same inputs


def test_refusal_guard_warns_then_stops_with_a_checkpoint(probe_run, tmp_path, capsys, no_dashboard):
    # the random tiny model never prefers a refusal token: share 0 at every probe
    result = train(load_config("tiny", overrides(tmp_path, "min_refusal_share=0.5", "stop_below_min_refusal=true",
                                                 "checkpoint_every=0", assets=probe_run)))
    out = capsys.readouterr().out
    assert "step 0: harmful refusal share 0.000 is below train.min_refusal_share = 0.5" in out
    assert "step 2: harmful refusal share 0.000 is below" in out and "stopping" in out
    assert result.stopped and result.final_step == 2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert [r["step"] for r in train_lines(tmp_path)] == [1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] == result.stopped


def test_guard_settings_are_checked():
    with pytest.raises(ValueError, match="min_refusal_share"):
        load_config("tiny", ["min_refusal_share=0.5"])          # the probe is off
    with pytest.raises(ValueError, match="stop_below_min_refusal"):
        load_config("tiny", ["safety_probe_every=2", "stop_below_min_refusal=true"])


def test_report_redraws_the_dashboard(probe_run, tmp_path, capsys):
    out = tmp_path / "dash.png"
    assert main(["report", str(probe_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_two_processes_log_the_same_probe_values(probe_run, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_distributed import torchrun
    torchrun("-m", "fastprocon.cli", "train", "--config", "tiny", *overrides(tmp_path, assets=probe_run))
    got, want = probe_lines(tmp_path), probe_lines(probe_run)
    assert [r["step"] for r in got] == [0, 2, 4]
    for g, w in zip(got, want):
        assert g[SHARE_KEY] == w[SHARE_KEY]
        for key in PROBE_KEYS[1:]:
            gv = [x for x in g[key] if x is not None] if isinstance(g[key], list) else g[key]
            wv = [x for x in w[key] if x is not None] if isinstance(w[key], list) else w[key]
            assert gv == pytest.approx(wv, rel=1e-4, abs=1e-5), (key, g["step"])
