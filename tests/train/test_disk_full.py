"""A write that cannot be completed (a full disk, here a file-size limit set with RLIMIT_FSIZE in
a subprocess: the same short write) is one line naming the file, exit status 1: the tokenized-data
cache, the z0 cache, a checkpoint, and `fastprocon reference`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIMITED = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "limit = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
           "from fastprocon.cli import main; sys.exit(main(sys.argv[2:]))")


def limited(tmp_path, limit, *argv, cache=None):
    subprocess.run([sys.executable, "-c", "from fastprocon.models.load import load_model; load_model('tiny')"],
                   cwd=REPO, check=True, timeout=600)     # the tiny model's files made before the limit
    # no .pyc files: one cut short by the limit would break every later import
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTPROCON_DATA_CACHE": str(cache or tmp_path / "cache"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("limit, written", [
    (20_000, r"cache/benign-\w+\.tokens\.safetensors: File too large"),        # the tokenized data
    (38_000, r"run/reference\.shard0-of-1\.safetensors: File too large"),     # z0
    (600_000, r"run/checkpoints/\.tmp-step_000001: (File too large|a write came up short)"),
])
def test_a_write_that_cannot_complete_is_one_line_naming_the_file(tmp_path, limit, written):
    import re
    out = limited(tmp_path, limit, "train", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "max_steps=1",
                  "export=false")
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"fastprocon train: error: cannot write {tmp_path}/{written}", last), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
