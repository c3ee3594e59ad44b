"""One line naming the problem, not a traceback and not a misleading cause: max_length beyond the
model's context, a rerun with max_steps below the run's step, resume= pointing at another run's
checkpoint, and metrics.jsonl with a line still being written (report) or a broken one."""
import json
import shutil
from pathlib import Path

import pytest

from fastprocon.cli import main
from fastprocon.train import load_config, train
from fastprocon.train.metrics import read_metrics


def run(run_dir, *extra):
    return train(load_config("tiny", [f"run_dir={run_dir}", "max_steps=2", "checkpoint_every=1", "export=false",
                                      *extra]))


@pytest.fixture(scope="module")
def procon_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("procon")
    run(run_dir)
    return run_dir


def copy_of(run_dir, tmp_path, name="run"):
    return Path(shutil.copytree(run_dir, tmp_path / name, ignore=shutil.ignore_patterns(".lock")))


def test_max_length_beyond_the_models_context_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"config data.max_length = 4096 is more than the context of model tiny "
                                         r"\(2048 tokens\); lower it to at most 2048"):
        run(tmp_path, "schedule=off", "max_length=4096")


def test_a_rerun_with_max_steps_below_the_runs_step_names_both(procon_run, tmp_path):
    run_dir = copy_of(procon_run, tmp_path)
    with pytest.raises(ValueError, match=rf"train.max_steps = 1, but the run in {run_dir} is already at step 2 "
                                         r"\(.*step_000002\); raise it to go on"):
        run(run_dir, "max_steps=1")


def test_resume_from_another_runs_checkpoint_names_the_other_files(procon_run, tmp_path):
    other = procon_run / "checkpoints" / "step_000002"
    # the directions made here equal the other run's (same model and prompts); its z0 cache is another build
    with pytest.raises(ValueError, match=rf"cannot resume from {other}: it was trained with the reference cache "
                                         rf"{procon_run}/reference.safetensors, this run has {tmp_path}/new/"
                                         r"reference.safetensors \(another run's checkpoint\?\); to go on from it "
                                         r"set procon.reference_cache"):
        run(tmp_path / "new", "max_steps=3", f"resume={other}")


def test_resume_pointing_at_no_checkpoint_names_it_without_advising_to_remove_its_parent(tmp_path):
    missing = tmp_path / "typo" / "step_000002"
    with pytest.raises(ValueError, match=rf"checkpoint.resume = '{missing}': no such checkpoint directory") as info:
        run(tmp_path / "new", f"resume={missing}")
    assert "remove" not in str(info.value)


def test_report_skips_a_line_still_being_written_and_names_a_broken_one(procon_run, tmp_path, capsys):
    run_dir = copy_of(procon_run, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    complete = metrics.read_text()
    metrics.write_text(complete + '{"step": 3, "ce": 4.')          # being appended right now
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert main(["report", str(run_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    lines = complete.splitlines()
    metrics.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    assert main(["report", str(run_dir)]) == 2
    assert f"{metrics} line 2 is not valid JSON" in capsys.readouterr().err
    metrics.write_text(complete + json.dumps([1, 2]) + "\n")
    with pytest.raises(ValueError, match="line 3 is not a JSON object"):
        read_metrics(run_dir)
