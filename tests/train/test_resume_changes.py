"""What a resume accepts and refuses beyond the checkpoint itself: every file of the z0 cache the
run started with, and the settings of the run (a change of meaning is refused naming the key and
both values unless allowed by checkpoint.resume_changes, and then recorded)."""
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from fastprocon.train import load_config, train


@pytest.fixture(scope="module")
def procon_run(tmp_path_factory):
    """2 ProCon steps; directions and z0 made in the run directory."""
    run_dir = tmp_path_factory.mktemp("procon")
    train(load_config("tiny", [f"run_dir={run_dir}", "max_steps=2", "checkpoint_every=1", "export=false"]))
    return run_dir


def copy_of(run_dir, tmp_path):
    return Path(shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))


def resume(run_dir, *extra):
    return train(load_config("tiny", [f"run_dir={run_dir}", "max_steps=3", "checkpoint_every=1", "export=false",
                                      *extra]))


def add_to_z0(shard: Path, value: float) -> None:
    """Rewrite the z0 values of a cache shard in place (z0 + value), header and size unchanged."""
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    entry = json.loads(raw[8:8 + n])["z0"]
    start, stop = (8 + n + o for o in entry["data_offsets"])
    assert entry["dtype"] == "F32"
    z0 = np.frombuffer(raw[start:stop], np.float32) + np.float32(value)
    shard.write_bytes(raw[:start] + z0.tobytes() + raw[stop:])


def test_a_rewritten_z0_shard_is_refused_on_resume(procon_run, tmp_path):
    run_dir = copy_of(procon_run, tmp_path)
    shard = run_dir / "reference.shard0-of-1.safetensors"
    size = shard.stat().st_size
    add_to_z0(shard, 3.0)
    assert shard.stat().st_size == size
    with pytest.raises(ValueError, match=rf"cannot resume from .*step_000002: the reference cache {run_dir}/"
                                         r"reference.safetensors changed since the run started .*"
                                         r"reference.shard0-of-1.safetensors"):
        resume(run_dir)


@pytest.mark.parametrize("change, key, old, new", [
    ("alpha=5.0", "procon.alpha", "0.2", "5.0"),
    ("norm=l2sq", "procon.norm", "'l1'", "'l2sq'"),
    ("schedule=off", "procon.schedule", "'constant'", "'off'"),
    ("lr=1e-3", "optim.lr", "0.003", "0.001"),
])
def test_a_change_of_meaning_is_refused_naming_the_key_and_both_values(procon_run, tmp_path, change, key, old, new):
    run_dir = copy_of(procon_run, tmp_path)
    first = (run_dir / "config.toml").read_text()
    with pytest.raises(ValueError, match=rf"cannot resume from .*step_000002: it was trained with {key} = {old}, "
                                         rf"this config gives {new}, which changes what the run computes; .*"
                                         rf"checkpoint.resume_changes = \"{key.split('.')[1]}\""):
        resume(run_dir, change)
    assert (run_dir / "config.toml").read_text() == first
    assert not list(run_dir.glob("config.step_*.toml"))


def test_a_fixed_key_is_refused_even_when_all_changes_are_allowed(procon_run, tmp_path):
    run_dir = copy_of(procon_run, tmp_path)
    with pytest.raises(ValueError, match=r"it was trained with data.max_length = 128, this config gives 200 \(another "
                                         r"model or batch plan\)"):
        resume(run_dir, "max_length=200", "resume_changes=all")


def test_an_allowed_change_is_recorded_and_every_config_version_kept(procon_run, tmp_path, capsys):
    run_dir = copy_of(procon_run, tmp_path)
    first = (run_dir / "config.toml").read_text()
    capsys.readouterr()
    result = resume(run_dir, "alpha=5.0", "resume_changes=alpha")
    assert result.start_step == 2
    out = capsys.readouterr().out
    assert "config changed since step_000002: procon.alpha 0.2 -> 5.0, " in out and "train.max_steps 2 -> 3" in out
    assert (run_dir / "config.toml").read_text() == first                       # the first config, kept
    second = load_config(str(run_dir / "config.step_000002.toml"))
    assert second.procon.alpha == 5.0 and second.checkpoint.resume_changes == "alpha"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "config_changes": {"procon.alpha": [0.2, 5.0], "train.max_steps": [2, 3],
                                          "train.run_dir": [str(procon_run), str(run_dir)],
                                          "checkpoint.resume_changes": ["", "alpha"]}} in records
    assert [r["alpha"] for r in records if "ce" in r] == [0.2, 0.2, 5.0]


def test_harmless_changes_resume_without_an_override_and_keep_the_config_version(procon_run, tmp_path):
    run_dir = copy_of(procon_run, tmp_path)
    result = resume(run_dir, "log_every=1", "checkpoint_every=3", "micro_batch_size=2", "keep_checkpoints=5",
                    "backend=torch")
    assert result.start_step == 2 and result.final_step == 3
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("config_changes" in r for r in records)                    # nothing of meaning changed
    assert load_config(str(run_dir / "config.step_000002.toml")).train.log_every == 1


def test_an_unknown_key_in_resume_changes_is_an_error():
    with pytest.raises(ValueError, match=r"checkpoint.resume_changes = 'alpah': must be 'all' or config keys "
                                         r"\(unknown: alpah\)"):
        load_config("tiny", ["resume_changes=alpah"])
