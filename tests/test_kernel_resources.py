"""The Triton kernels compile for a real GPU target (sm_90) without a GPU, with no register
spills: the one check of the compiled (not interpreted) kernels that runs on a CPU machine.
benchmarks/kernel_resources.py does the compiling, in a subprocess without TRITON_INTERPRET."""
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"


def nvidia_tools_present() -> bool:
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or spec.origin is None:
        return False
    bin_dir = Path(spec.origin).parent / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


@pytest.mark.skipif(not nvidia_tools_present(), reason="this triton has no NVIDIA backend tools (ptxas, cuobjdump)")
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.csv"
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--d", "64", "4096", "--dtypes", "bf16",
                             "fp32", "fp64", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    rows = list(csv.DictReader(out.open()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [r for r in rows if r["error"] or int(r["spill_bytes"])], rows
    # Every kernel for every dtype, both block regimes (small D, large D), every norm.
    assert {(r["kernel"], r["hidden_dtype"]) for r in rows} == \
        {(k, d) for k in ("fwd", "bwd", "sum_partials") for d in ("bf16", "fp32", "fp64")}
    assert {r["D"] for r in rows if r["kernel"] != "sum_partials"} == {"64", "4096"}
    assert {r["flags"].split()[0] for r in rows if r["kernel"] == "fwd"} == {"norm=l1", "norm=l2sq", "norm=huber"}
    assert all(0 < int(r["regs"]) <= 255 for r in rows)
    assert "target sm_90" in result.stdout


def test_refuses_to_run_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unset TRITON_INTERPRET" in result.stderr
