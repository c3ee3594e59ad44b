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
