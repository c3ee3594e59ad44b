"""HSDP (parallel.replicate x parallel.shard, a 2-D device mesh): 4 processes on gloo as 2 x 2 give
the losses and gradients of 1 process; a 2 x 2 checkpoint resumes on 1 process (another strategy
and world size) with the same steps; its export equals the 1-process export; a mesh that does not fit
the process count is one clear error.

Run as a script (under torchrun) this file is the gradient worker of the 2 x 2 test.
"""
import json
import os
import shutil
import sys

import pytest
import torch
from conftest import second_step_gradients
from test_train_distributed import torchrun

from fastprocon.distributed.mesh import mesh_shape

# l2sq: a smooth norm, so the processes' different summation orders stay at fp32 rounding
STEPS = ["norm=l2sq", "max_steps=4", "log_every=1", "checkpoint_every=2", "keep_checkpoints=2", "micro_batch_size=2"]
GRAD = ["schedule=constant", "alpha=1.0", "norm=l2sq", "batch_size=8", "micro_batch_size=2", "packing=off",
        "export=false", "resume=never"]


def gradient_worker(out: str, run_dir: str, assets: str, *extra: str) -> None:
    """One optimizer step, then step 2's CE/ProCon sums and full gradients -> ``out`` (rank 0)."""
    from fastprocon.train import load_config

    cfg = load_config("tiny", [f"run_dir={run_dir}", f"procon.directions={assets}/directions.safetensors",
                               f"procon.reference_cache={assets}/reference.safetensors", *GRAD, *extra])
    sums, grads, accum, _ = second_step_gradients(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"grads": grads, "sums": sums, "accum": accum}, out)


@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory):
    """The tiny config for 4 steps on 4 processes as 2 replicas x 2 shards (checkpoints at 2 and 4, export)."""
    run_dir = tmp_path_factory.mktemp("hsdp")
    out = torchrun("-m", "fastprocon.cli", "train", "--config", "tiny", f"run_dir={run_dir}", *STEPS,
                   "parallel.replicate=2", "export=true", nproc=4)
    assert "HSDP: 2 replicas x 2 shards" in out
    return run_dir


def test_hsdp_gradients_equal_one_process(hsdp_run, tmp_path):
    gradient_worker(str(tmp_path / "one.pt"), str(tmp_path / "one"), str(hsdp_run))
    torchrun(__file__, tmp_path / "four.pt", tmp_path / "four", hsdp_run, "parallel.replicate=2", "parallel.shard=2",
             nproc=4)
    one, four = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "four.pt")
    assert (one["accum"], four["accum"]) == (4, 1)
    torch.testing.assert_close(one["sums"], four["sums"], rtol=1e-5, atol=0)
    assert one["sums"][1] > 0
    assert one["grads"].keys() == four["grads"].keys() and one["grads"]
    for name, g1 in one["grads"].items():
        g4 = four["grads"][name]
        assert (g1 - g4).norm() <= 1e-4 * g1.norm() + 1e-8, name


def test_hsdp_checkpoint_resumes_on_one_process_with_the_same_steps(hsdp_run, tmp_path):
    """2 x 2 on 4 processes -> plain FSDP on 1: the checkpoint reshards; the change of parallel settings
    is harmless (no override asked, no config_changes record), and steps 3-4 agree to fp32 rounding."""
    from fastprocon.train import load_config, train
    from fastprocon.train.metrics import read_metrics

    run_dir = tmp_path / "run"
    shutil.copytree(hsdp_run, run_dir, ignore=shutil.ignore_patterns("model", ".lock", "step_000004"))
    (run_dir / "checkpoints" / "latest").write_text("step_000002\n")
    ckpt = run_dir / "checkpoints" / "step_000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 4 and state["config"]["parallel"] == {"replicate": 2, "shard": 0}
    result = train(load_config("tiny", [f"run_dir={run_dir}", *STEPS, "export=false"]))
    assert result.start_step == 2
    got, want = read_metrics(run_dir), read_metrics(hsdp_run)
    assert not any("config_changes" in r for r in got)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for g, w in zip(got[2:], want[2:]):
        assert g["lr"] == w["lr"]
        for key in ("ce", "procon", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (key, g["step"])


def test_hsdp_export_equals_the_one_process_export(hsdp_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from fastprocon.train import load_config, train

    run_dir = tmp_path / "run"
    shutil.copytree(hsdp_run, run_dir, ignore=shutil.ignore_patterns("model", ".lock"))
    result = train(load_config("tiny", [f"run_dir={run_dir}", *STEPS, "export=true"]))   # the export only
    assert result.start_step == 4
    ids = torch.arange(2, 50)[None]
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(d / "model")(ids).logits for d in (hsdp_run, run_dir)]
    assert torch.equal(*logits)


@pytest.mark.parametrize("replicate, shard, world, said", [
    (2, 3, 4, r"parallel.replicate x parallel.shard = 2 x 3 = 6 processes, but this run has 4"),
    (3, 0, 4, r"parallel.replicate = 3 does not divide the 4 process\(es\)"),
])
def test_a_mesh_that_does_not_fit_the_process_count_is_one_clear_error(replicate, shard, world, said):
    with pytest.raises(ValueError, match=said):
        mesh_shape(replicate, shard, world)
    assert mesh_shape(2, 0, 4) == mesh_shape(2, 2, 4) == (2, 2) and mesh_shape(1, 0, 3) == (1, 3)


def test_the_trainer_refuses_a_mesh_that_does_not_fit(tmp_path):
    from fastprocon.train import load_config, train

    with pytest.raises(ValueError, match=r"^config parallel.replicate = 2 does not divide the 1 process"):
        train(load_config("tiny", [f"run_dir={tmp_path}", "parallel.replicate=2", "max_steps=1"]))
    with pytest.raises(ValueError, match=r"parallel.shard = -1: must be >= 0"):
        load_config("tiny", ["parallel.shard=-1"])


if __name__ == "__main__":
    gradient_worker(*sys.argv[1:])
