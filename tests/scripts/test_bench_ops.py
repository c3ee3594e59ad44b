"""benchmarks/bench_ops.py at toy size: one tiny-model micro-step profiled with ProCon off, at half
and at all layers; per constrained layer the two ProCon ops and at most 4 other operators, and the
counts are deterministic (the script checks two profiles agree)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_ops  # noqa: E402
import harness  # noqa: E402


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("ops") / "ops_cpu.csv"
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}   # this checkout's fastprocon
    subprocess.run([sys.executable, str(BENCH / "bench_ops.py"), "--device", "cpu", "--models", "tiny", "--seq", "16",
                    "--threads", "1", "--out", str(out)], check=True, timeout=600, env=env)
    return harness.read_csv(out, bench_ops.FIELDS)


def test_every_layout_phase_and_counter_is_measured(rows):
    assert {(r["layout"], r["phase"], r["counter"]) for r in rows} == {
        (layout, phase, counter) for layout in ("padded", "packed") for phase in ("forward", "backward")
        for counter in ("ops", "nested_ops")}
    for r in rows:
        assert (r["model"], r["layers"], r["k"], r["backend"]) == ("tiny", "4", "2", "torch")
        assert int(r["off"]) < int(r["on_k"]) < int(r["on_all"])
        assert r["command"].startswith("python benchmarks/bench_ops.py --device cpu --models tiny")


def test_a_constrained_layer_costs_the_two_procon_ops_and_at_most_four_more(rows):
    for r in rows:
        if r["counter"] != "ops":
            continue
        kernel = "projection_fwd_torch" if r["phase"] == "forward" else "projection_bwd_torch"
        assert f"fastprocon::{kernel} +1" in r["added_per_layer"], r
        assert float(r["procon_kernels_per_layer"]) == 1
    beyond = {(r["layout"]): sum(float(x["beyond_procon_kernels"]) for x in rows
                                 if x["layout"] == r["layout"] and x["counter"] == "ops") for r in rows}
    assert all(0 <= b <= 4 for b in beyond.values()), beyond


def test_operator_names_are_told_from_profiler_ranges():
    assert bench_ops.is_operator("aten::add") and bench_ops.is_operator("fastprocon::projection_fwd_torch")
    assert not bench_ops.is_operator("autograd::engine::evaluate_function: MulBackward0")
    assert not bench_ops.is_operator("AnchorProjectionFunctionBackward")
    assert not bench_ops.is_operator("torch::autograd::AccumulateGrad")
