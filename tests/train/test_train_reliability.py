"""What a run survives and refuses (tiny model, single process, plus one 2-process run): checksum
manifests and the fall-back to the newest intact checkpoint, pruning that spares intact
checkpoints, the directions and reference cache checked on resume, SIGTERM/SIGINT in a real
subprocess (checkpoint, one line, exit status 75, resume), a read-only run directory, export
staging left by a kill, and summary.json after a resume or an interrupted export."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastprocon.train.metrics as metrics_module
from fastprocon.cli import main
from fastprocon.train import load_config, train
from fastprocon.train.checkpoint import CheckpointError
from fastprocon.train.metrics import read_metrics
from fastprocon.train.signals import STOP_EXIT_STATUS
from fastprocon.utils.checksums import verify_manifest

REPO = Path(__file__).resolve().parents[2]


def quick(run_dir, *extra):
    """Plain fine-tuning (no directions needed): a few seconds a run."""
    items = [f"run_dir={run_dir}", "schedule=off", "max_steps=2", "checkpoint_every=1", "log_every=1",
             "export=false", *extra]
    return train(load_config("tiny", items))


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """3 steps with a checkpoint after each (all kept); tests damage copies of it."""
    run_dir = tmp_path_factory.mktemp("three")
    quick(run_dir, "max_steps=3", "keep_checkpoints=3")
    return run_dir


def copy_of(run_dir, tmp_path):
    return Path(shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))


def flip_bytes(ckpt: Path) -> Path:
    """Change bytes in the middle of the model shard, keeping its size."""
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    shard.write_bytes(bytes(data))
    return shard


# -- checkpoint integrity ------------------------------------------------------------------------

def test_every_checkpoint_has_a_manifest_of_all_its_files(three_steps):
    ckpt = three_steps / "checkpoints" / "step_000003"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    files = sorted(p.name for p in ckpt.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files and ".metadata" in files and "trainer_state.json" in files
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())


def test_flipped_bytes_of_the_same_size_are_caught_and_the_previous_checkpoint_resumed(three_steps, tmp_path,
                                                                                       capsys):
    run_dir = copy_of(three_steps, tmp_path)
    ckpts = run_dir / "checkpoints"
    size = (shard := flip_bytes(ckpts / "step_000003")).stat().st_size
    assert size == (three_steps / "checkpoints" / "step_000003" / shard.name).stat().st_size
    capsys.readouterr()
    result = quick(run_dir, "max_steps=3", "keep_checkpoints=3")
    out = capsys.readouterr().out
    assert re.search(r"warning: checkpoint .*step_000003 is damaged \(__0_0.distcp fails its sha256 checksum "
                     r"\(same size, different bytes\)\); resuming from the newest intact one, .*step_000002\n", out)
    assert result.start_step == 2
    # step 3 redone from the intact step 2 equals the original step 3 (CPU fp32 is deterministic)
    want = [{k: r[k] for k in ("step", "ce", "grad_norm")} for r in read_metrics(three_steps)]
    assert [{k: r[k] for k in ("step", "ce", "grad_norm")} for r in read_metrics(run_dir)] == want
    assert (ckpts / "latest").read_text().strip() == "step_000003"
    assert verify_manifest(ckpts / "step_000003") is None   # rewritten intact


def test_no_intact_checkpoint_stops_the_run(three_steps, tmp_path):
    run_dir = copy_of(three_steps, tmp_path)
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        flip_bytes(ckpt)
    with pytest.raises(CheckpointError, match=r"checkpoint .*step_000003 is damaged \(.*sha256.*\); no earlier "
                                              r"checkpoint is intact: remove .*checkpoints to start over"):
        quick(run_dir, "max_steps=4")
    (run_dir / "checkpoints" / "step_000001" / "manifest.json").unlink()   # no manifest is no proof either
    with pytest.raises(CheckpointError, match="no earlier checkpoint is intact"):
        quick(run_dir, "max_steps=4")


def test_pruning_keeps_intact_checkpoints_behind_a_damaged_newer_one(three_steps, tmp_path, capsys):
    """Resumed from step 1 behind damaged steps 2 and 3, the run writes step 2 with keep = 2: the
    damaged step 3 must not count as one of the two kept, so step 1 (intact) stays."""
    run_dir = copy_of(three_steps, tmp_path)
    ckpts = run_dir / "checkpoints"
    flip_bytes(ckpts / "step_000002")
    flip_bytes(ckpts / "step_000003")
    result = quick(run_dir, "max_steps=2", "keep_checkpoints=2")
    assert result.start_step == 1
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000001", "step_000002", "step_000003"]
    assert (ckpts / "latest").read_text().strip() == "step_000002"


# -- the directions and reference cache a run started with -----------------------------------------

@pytest.fixture(scope="module")
def procon_run(tmp_path_factory):
    """2 ProCon steps; directions and z0 made in the run directory."""
    run_dir = tmp_path_factory.mktemp("procon")
    train(load_config("tiny", [f"run_dir={run_dir}", "max_steps=2", "checkpoint_every=1", "export=false"]))
    return run_dir


def resume_procon(run_dir, *extra):
    return train(load_config("tiny", [f"run_dir={run_dir}", "max_steps=3", "checkpoint_every=1", "export=false",
                                      *extra]))


def test_resume_under_replaced_directions_is_refused(procon_run, tmp_path, capsys):
    run_dir = copy_of(procon_run, tmp_path)
    state = json.loads((run_dir / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["procon_inputs"]["directions"] == str(procon_run / "directions.safetensors")
    # the sequence: new directions over the run's (told --force), the reference cache rebuilt
    assert main(["directions", "--model", "tiny", "--max-prompts", "4", "--no-quality", "--out", str(run_dir)]) == 2
    assert "belongs to the training run" in capsys.readouterr().err
    assert main(["directions", "--model", "tiny", "--max-prompts", "4", "--no-quality", "--force",
                 "--out", str(run_dir)]) == 0
    (run_dir / "reference.safetensors").unlink()
    with pytest.raises(ValueError, match=rf"cannot resume from .*step_000002: the directions {run_dir}/directions."
                                         r"safetensors changed since the run started \(directions_hash .*"):
        resume_procon(run_dir)


def test_resume_under_a_rebuilt_reference_cache_is_refused(procon_run, tmp_path):
    run_dir = copy_of(procon_run, tmp_path)
    (run_dir / "reference.safetensors").unlink()   # rebuilt below in bf16: other z0 bytes, same identity
    with pytest.raises(ValueError, match=rf"cannot resume from .*step_000002: the reference cache {run_dir}/"
                                         r"reference.safetensors changed since the run started"):
        resume_procon(run_dir, "procon.reference_dtype=bf16")


def test_resume_with_the_same_inputs_goes_on(procon_run, tmp_path):
    run_dir = copy_of(procon_run, tmp_path)
    assert resume_procon(run_dir).start_step == 2


# -- signals ---------------------------------------------------------------------------------------

def start_cli(run_dir, *extra):
    cmd = [sys.executable, "-m", "fastprocon.cli", "train", "--config", "tiny", f"run_dir={run_dir}",
           "schedule=off", "max_steps=500", "checkpoint_every=0", "log_every=1", "export=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_after_steps(proc, run_dir, sig, steps=2, timeout=240):
    """Send ``sig`` once metrics.jsonl shows ``steps`` steps; the process's (status, stdout, stderr)."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    try:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training steps in time"
            time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def test_sigterm_and_sigint_stop_after_the_step_with_a_checkpoint_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    status, out, err = signal_after_steps(start_cli(run_dir), run_dir, signal.SIGTERM)
    assert status == STOP_EXIT_STATUS, err[-3000:]
    found = re.search(r"^stopped by SIGTERM at step (\d+); checkpoint (\S+); rerun to resume$", err, re.M)
    assert found, err[-3000:]
    step, ckpt = int(found[1]), Path(found[2])
    assert "Traceback" not in err and ckpt == run_dir / "checkpoints" / f"step_{step:06d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, step + 1))
    assert json.loads((run_dir / "summary.json").read_text())["stopped_by"] == "SIGTERM"

    # SIGINT (Ctrl-C), in this process to save a second start-up: the rerun resumes, then stops
    from fastprocon.train import Trainer
    original = Trainer.step

    def interrupted_at(self, s):
        original(self, s)
        if s == step + 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "step", interrupted_at)
    capsys.readouterr()
    argv = ["train", "--config", "tiny", f"run_dir={run_dir}", "schedule=off", "max_steps=500", "checkpoint_every=0",
            "log_every=1", "export=false"]
    assert main(argv) == STOP_EXIT_STATUS
    out, err = capsys.readouterr()
    assert f"resumed from {ckpt} at step {step}" in out
    assert err.splitlines()[-1] == (f"stopped by SIGINT at step {step + 2}; checkpoint "
                                    f"{run_dir / 'checkpoints' / f'step_{step + 2:06d}'}; rerun to resume")
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, step + 3))


def test_a_signal_during_set_up_stops_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    import fastprocon.train.trainer as trainer_module
    original = trainer_module.load_training_data

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)    # delivered here, in the main thread, before any step
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "load_training_data", signalled)
    run_dir = tmp_path / "run"
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["train", "--config", "tiny", f"run_dir={run_dir}", "schedule=off", "export=false"]) == STOP_EXIT_STATUS
    assert capsys.readouterr().err.splitlines()[-1] == ("fastprocon train: stopped by SIGTERM outside the training "
                                                        "steps; checkpoint (none yet); rerun to resume")
    assert signal.getsignal(signal.SIGTERM) is previous   # the run's handlers are gone again
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("lagged", [False, True])
def test_the_stop_flag_is_agreed_at_the_boundary_or_one_later_when_lagged(monkeypatch, lagged):
    """The collective logic with a stand-in for 2 processes (all_reduce of MAX over [this, other]);
    lagged is the GPU mode (on CUDA with a pinned copy and an event, not available here)."""
    import torch
    import torch.distributed as dist

    from fastprocon.train.signals import StopRequest
    other = {"flag": 0}

    def all_reduce(tensor, op=None):
        tensor.copy_(torch.maximum(tensor, torch.full_like(tensor, other["flag"])))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    stop = StopRequest(torch.device("cpu"), lagged=lagged)
    assert [stop.agreed(), stop.agreed()] == [None, None]
    other["flag"] = int(signal.SIGTERM)            # the other process got SIGTERM during this step
    first = stop.agreed()
    assert first == (None if lagged else "SIGTERM")
    assert stop.agreed() == "SIGTERM"               # every process, at the same boundary
    other["flag"] = 0
    stop = StopRequest(torch.device("cpu"), lagged=lagged)
    assert stop.agreed() is None
    stop.signum = int(signal.SIGINT)                 # during the last step: read at once
    assert stop.agreed(now=True) == "SIGINT"


WORKER = """
import os, signal, sys
from fastprocon.train import Trainer, load_config, train
original = Trainer.step
def step(self, s):
    original(self, s)
    if s == 1 and self.ctx.rank == 1:   # only rank 1 is signalled, after its 2nd step
        os.kill(os.getpid(), signal.SIGTERM)
Trainer.step = step
result = train(load_config("tiny", sys.argv[1:]))
print(f"rank {os.environ['RANK']} stopped_by {result.stopped_by} at {result.final_step}", flush=True)
"""


def test_under_torchrun_all_ranks_stop_at_the_same_step(tmp_path):
    from test_train_distributed import torchrun
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run_dir = tmp_path / "run"
    status, out, err = torchrun(worker, f"run_dir={run_dir}", "schedule=off", "max_steps=50", "checkpoint_every=0",
                                "log_every=1", "export=false", check=False)
    assert status == 0, err[-4000:]
    assert sorted(re.findall(r"rank \d stopped_by \w+ at \d+", out)) == ["rank 0 stopped_by SIGTERM at 2",
                                                                      "rank 1 stopped_by SIGTERM at 2"], out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    state = json.loads((run_dir / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


# -- smaller ones ----------------------------------------------------------------------------------

def test_a_run_directory_made_read_only_mid_run_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    """chmod does not stop root (the tests may run as root), so the read-only file system is
    simulated where the trainer appends its metrics."""
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"

    def read_only_after_step_1(path, mode="r", *args, **kwargs):
        if Path(path) == metrics and "a" in mode and metrics.is_file():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "open", read_only_after_step_1, raising=False)
    argv = ["train", "--config", "tiny", f"run_dir={run_dir}", "schedule=off", "max_steps=3", "log_every=1",
            "export=false"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"fastprocon train: error: cannot write {metrics}: Read-only file system"
    assert "Traceback" not in err


def test_an_unwritable_checkpoint_directory_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from torch.distributed.checkpoint.filesystem import FileSystem

    def read_only(self, path, mode):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(FileSystem, "create_stream", read_only)
    run_dir = tmp_path / "run"
    argv = ["train", "--config", "tiny", f"run_dir={run_dir}", "schedule=off", "max_steps=1", "export=false"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert re.fullmatch(rf"fastprocon train: error: cannot write {run_dir}/checkpoints/\.tmp-step_000001/\S+: "
                        r"Read-only file system", last), err[-2000:]
    assert "Traceback" not in err


def test_export_staging_left_by_a_kill_is_removed_and_the_summary_has_the_whole_run(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    quick(run_dir)                                               # steps 1-2
    quick(run_dir, "max_steps=3")                                # resumed: step 3
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_metrics(run_dir)
    assert summary["start_step"] == 2 and summary["first_ce"] == records[0]["ce"] != records[2]["ce"]
    assert summary["last_ce"] == records[2]["ce"]

    def killed_mid_export(model, tokenizer, out_dir, directions, **kwargs):   # as a kill -9 would leave it
        (Path(out_dir).parent / f".{Path(out_dir).name}.abc123").mkdir()
        raise KeyboardInterrupt("killed during the export")

    monkeypatch.setattr("fastprocon.train.trainer.export_model", killed_mid_export)
    with pytest.raises(KeyboardInterrupt):
        quick(run_dir, "max_steps=3", "export=true")
    assert (run_dir / ".model.abc123").is_dir()
    monkeypatch.undo()
    capsys.readouterr()
    result = quick(run_dir, "max_steps=3", "export=true")       # nothing left to train: export only
    assert "removed .model.abc123: staging left by an interrupted export" in capsys.readouterr().out
    assert not list(run_dir.glob(".model.*")) and result.export_dir == run_dir / "model"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["first_ce"] == records[0]["ce"] and summary["last_ce"] == records[2]["ce"]
    assert None not in (summary["checkpoint"], summary["export_dir"], summary["first_ce"], summary["last_ce"])
