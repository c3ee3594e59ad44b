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

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_resources.py"


ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def ptxas_present() -> bool:
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return False
    from triton.backends.nvidia import compiler
    try:
        return Path(compiler.get_ptxas(90).path).exists()
    except Exception:  # noqa: BLE001  (no usable ptxas: the checks below cannot run)
        return False


needs_ptxas = pytest.mark.skipif(not ptxas_present(), reason="this triton has no NVIDIA backend (ptxas)")


@needs_ptxas
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    out = tmp_path / "resources.csv"
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--d", "64", "4096", "--dtypes", "bf16",
                             "fp32", "fp64", "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    rows = list(csv.DictReader(out.open()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [r for r in rows if r["error"] or int(r["spill_bytes"])], rows
    # Every kernel for every dtype, both block regimes (small D, large D), every norm.
    assert {(r["kernel"], r["hidden_dtype"]) for r in rows} == \
        {(k, d) for k in ("fwd", "bwd", "sum_partials", "sum_rows") for d in ("bf16", "fp32", "fp64")}
    assert {r["D"] for r in rows if not r["kernel"].startswith("sum_")} == {"64", "4096"}
    assert any("dir_grad=1" in r["flags"] for r in rows if r["kernel"] == "fwd")
    assert {r["flags"].split()[0] for r in rows if r["kernel"] == "fwd"} == {"norm=l1", "norm=l2sq", "norm=huber",
                                                                         "norm=band"}
    assert all(0 < int(r["regs"]) <= 255 for r in rows)
    assert "target sm_90" in result.stdout


def test_refuses_to_run_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unset TRITON_INTERPRET" in result.stderr


@needs_ptxas
def test_a_spilling_tile_is_reported():
    """The fp64 forward at a 16 x 512 tile (the tile it had before this check) spills on sm_90:
    the report must say so, or a zero in the table above would mean nothing."""
    code = (f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import kernel_resources as kr; "
            "case = next(c for c in kr.cases([4096], ['fp64']) if c.kernel == 'fwd'); "
            "case = case._replace(constexprs={**case.constexprs, 'BLOCK_N': 16, 'BLOCK_D': 512}); "
            "row = kr.compile_case(case, 90); print(row['error'] or row['spill_bytes'])")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) > 0
