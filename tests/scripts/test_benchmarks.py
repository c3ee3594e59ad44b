"""The benchmark scripts run end to end at toy sizes, so they cannot rot. Nothing here asserts a
speed: only that every case is measured, the numbers are well formed, the CPU memory measure
sees what it should, and the report is drawn from the CSVs."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_penalty  # noqa: E402
import bench_train  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402

N, D = 256, 1024     # 1 MiB in fp32: above the 64 KiB mmap threshold of the CPU memory measure
PROVIDERS = [p for p in bench_penalty.PROVIDERS if p != "compiled"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """One toy run of each benchmark, written where report.py looks for them."""
    out = tmp_path_factory.mktemp("results")
    # One thread: on a busy 2-core machine, OpenMP barriers can stall tiny ops for whole time slices.
    # A subprocess: bench_penalty changes torch._dynamo settings, and spawns its own memory pass.
    # The compiled provider is left out: inductor's C++ build would take most of this test's time.
    subprocess.run([sys.executable, str(BENCH / "bench_penalty.py"), "--device", "cpu", "--n", str(N), "--d", str(D),
                    "--dtypes", "fp32", "--masked", "yes", "--modes", "full", "--providers", *PROVIDERS,
                    "--warmup-ms", "0", "--rep-ms", "0", "--threads", "1", "--out", str(out / "penalty_cpu.csv")],
                   check=True, timeout=300)
    threads = torch.get_num_threads()
    try:
        assert bench_train.main(["--device", "cpu", "--models", "tiny", "--batch", "2", "--seq", "16", "--warmup",
                                 "1", "--rounds", "2", "--threads", "1", "--out", str(out / "train_cpu.csv")]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_bench_penalty_measures_every_case(results):
    rows = harness.read_csv(results / "penalty_cpu.csv", bench_penalty.FIELDS)
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, "full") for p in PROVIDERS}
    for r in rows:
        assert (r["N"], r["D"], r["dtype"], r["masked"], r["device"]) == (str(N), str(D), "fp32", "True", "cpu")
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["gbps"]) > 0 and float(r["copy_gbps"]) > 0
        assert int(r["extra_mem_bytes"]) >= 0
        assert r["command"].startswith("python benchmarks/bench_penalty.py --device cpu")
        assert "--out" not in r["command"]            # the recorded command writes to the default place
    by = {r["provider"]: r for r in rows}
    assert by["injection"]["backend"] == "torch" and by["injection-reference"]["backend"] == "reference"


def test_cpu_memory_measure_sees_allocations():
    """The RSS high-water measure (in its own process, as bench_penalty runs it) finds a 4 MiB
    tensor and nothing in a no-op."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import harness; "
            "harness.prepare_cpu_memory_measurement(); cpu = torch.device('cpu'); "
            "print(harness.peak_extra_bytes(lambda: torch.ones(1 << 20), cpu), "
            "harness.peak_extra_bytes(lambda: None, cpu))")
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], check=True, capture_output=True, text=True,
                         timeout=120).stdout.split()
    tensor, nothing = int(out[0]), int(out[1])
    assert 4 << 20 <= tensor < (4 << 20) + (512 << 10), tensor
    assert nothing < 256 << 10, nothing


def test_bench_train_reports_every_variant(results):
    rows = harness.read_csv(results / "train_cpu.csv", bench_train.FIELDS)
    assert [r["variant"] for r in rows] == list(bench_train.VARIANTS)
    for r in rows:
        assert (r["model"], r["layers"], r["batch"], r["seq"], r["rounds"]) == ("tiny", "4", "2", "16", "2")
        assert float(r["tokens_per_s"]) > 0 and int(r["peak_mem_bytes"]) > 0
        assert r["mfu"] == ""                                   # no known peak FLOP/s on CPU
    assert float(rows[0]["step_overhead"]) == 0.0 and float(rows[0]["mem_overhead"]) == 0.0
    assert {rows[1]["backend"], rows[2]["backend"]} == {"reference", "torch"}


def test_bench_train_pairs_gives_overhead_spread_and_compile_time(tmp_path):
    """--setups --pairs: interleaved (off, fused) pairs on one batch; the overhead's spread and
    the compiled set-up's compile time are in the CSV, with no memory pass."""
    threads = torch.get_num_threads()
    out = tmp_path / "setups_cpu.csv"
    try:
        assert bench_train.main(["--device", "cpu", "--setups", "padded", "compiled", "--models", "tiny", "--batch",
                                 "2", "--micro-batch", "2", "--seq", "16", "--pairs", "3", "--warmup", "1",
                                 "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = harness.read_csv(out, bench_train.train_setups.FIELDS)
    assert [(r["setup"], r["variant"]) for r in rows] == [(s, v) for s in ("padded", "compiled")
                                                          for v in ("off", "fused")]
    for r in rows:
        assert (r["pairs"], r["steps"], r["peak_mem_bytes"]) == ("3", "3", "")
        low, high = float(r["overhead_ci95_low"]), float(r["overhead_ci95_high"])
        assert low <= float(r["step_overhead"]) <= high and float(r["overhead_p20"]) <= float(r["overhead_p80"])
        assert float(r["first_step_ms"]) > 0
        assert (r["compile_s"] != "") == (r["setup"] == "compiled")
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="--pairs needs --setups"):
        bench_train.parse_args(["--device", "cpu", "--pairs", "3"])


def test_pair_spread_brackets_the_median():
    spread = bench_train.train_setups.pair_spread([1.0, 1.01, 1.02, 0.99, 1.005])
    assert float(spread["overhead_ci95_low"]) <= 0.005 <= float(spread["overhead_ci95_high"])
    assert float(spread["overhead_p20"]) < 0.005 < float(spread["overhead_p80"])


def test_report_draws_figures_and_tables(results):
    written = report.write_report(results)
    assert {p.name for p in written} == {"penalty_cpu.png", "train_cpu.png", "README_perf.md"}
    for png in ("penalty_cpu.png", "train_cpu.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (results / "README_perf.md").read_text()
    assert f"| fp32 | True | {N} | {D} |" in text
    assert "GPU numbers are not measured yet" in text
    assert "ProCon fused at all 4 layers" in text                 # the headline, from the train CSV


def test_read_csv_rejects_another_schema(tmp_path):
    path = tmp_path / "penalty_cpu.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerow(["machine", "provider"])
    with pytest.raises(ValueError, match=r"penalty_cpu.csv: header .* is not the expected schema"):
        harness.read_csv(path, bench_penalty.FIELDS)
    with pytest.raises(FileNotFoundError, match="results file not found"):
        harness.read_csv(tmp_path / "missing.csv", bench_penalty.FIELDS)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench_penalty.parse_args(["--device", "cpu", "--extra-shapes", "8192by2048"])
    with pytest.raises(SystemExit, match="N and D must be >= 1"):
        bench_penalty.parse_args(["--device", "cpu", "--n", "0", "--d", "64"])
    with pytest.raises(ValueError, match="layer count >= 1"):
        bench_train.build_model("tiny:zero", torch.float32, torch.device("cpu"))
    with pytest.raises(SystemExit, match="--rounds must be >= 1"):
        bench_train.parse_args(["--device", "cpu", "--rounds", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.cuda.is_available"):
            harness.resolve_device("cuda")


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is for machines without a GPU")
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    """The one script a GPU session runs, end to end at toy sizes (every stage but the CUDA tests
    does real work here), so it cannot rot between GPU sessions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTPROCON_GPU_CHECK_SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.split("gpu_check summary (cpu)")[-1]
    for stage in ("GPU tests (kernels, trainer)", "API error tests", "bench_penalty", "bench_train",
                  "bench_train setups", "bench_ops", "host time per step", "load_8b + export", "report"):
        assert re.search(rf"{re.escape(stage)}\s+ok\n", summary), (stage, summary)
    assert {p.name for p in tmp_path.iterdir()} == {"penalty_cpu.csv", "train_cpu.csv", "penalty_cpu.png",
                                                     "train_cpu.png", "README_perf.md", "gpu_check.log",
                                                     "setups_cpu.csv", "setups_cpu.png", "load8b_cpu.csv",
                                                     "export8b_cpu.csv", "ops_cpu.csv", "host_cpu.csv"}
    assert "the 2 ProCon ops and 2 others (target <= 4)" in summary      # the headline of ops_cpu.csv
    rows = harness.read_csv(tmp_path / "setups_cpu.csv", bench_train.train_setups.FIELDS)
    assert {(r["setup"], r["variant"]) for r in rows} == {(s, v) for s in ("padded", "packed", "chunked")
                                                          for v in ("off", "fused")}
    by = {(r["setup"], r["variant"]): r for r in rows}
    assert float(by["packed", "off"]["padding_fraction"]) < float(by["padded", "off"]["padding_fraction"])
    assert all(int(r["peak_mem_bytes"]) >= 0 and float(r["real_tokens_per_s"]) > 0 for r in rows)   # tiny: ~0 extra
