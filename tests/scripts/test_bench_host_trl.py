"""bench_train.py --host and bench_trl.py run end to end at toy size (tiny config, a few steps):
every mode or variant is measured and the numbers are well formed. No speed is asserted."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_trl  # noqa: E402
import harness  # noqa: E402
import host_time  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(BENCH.parent), "TQDM_DISABLE": "1"}   # this checkout's fastprocon


def test_host_time_measures_both_modes(tmp_path):
    out = tmp_path / "host_cpu.csv"
    subprocess.run([sys.executable, str(BENCH / "bench_train.py"), "--device", "cpu", "--host", "tiny", "--pairs", "1",
                    "--host-steps", "3", "--set", "max_steps=4", "--threads", "1", "--run-dir", str(tmp_path / "run"),
                    "--out", str(out)], check=True, timeout=600, env=ENV)
    rows = {r["mode"]: r for r in harness.read_csv(out, host_time.FIELDS)}
    assert rows.keys() == {"sync", "prefetch"}
    for r in rows.values():
        assert (r["config"], r["model"], r["procon"], r["steps"]) == ("tiny", "tiny", "True", "2")
        assert float(r["step_ms"]) > float(r["fwd_bwd_ms"]) > 0 and float(r["host_ms"]) >= 0
        assert float(r["prepare_ms"]) > 0 and float(r["real_tokens_per_s"]) > 0
    assert rows["prefetch"]["prefetch_depth"] == "2" and rows["sync"]["prefetch_depth"] == "0"
    assert rows["prefetch"]["host_saved_ms"] != "" and rows["sync"]["host_saved_ms"] == ""


def test_bench_trl_measures_every_variant_or_says_why_not(tmp_path):
    out = tmp_path / "trl_cpu.csv"
    result = subprocess.run([sys.executable, str(BENCH / "bench_trl.py"), "--device", "cpu", "--config", "tiny",
                             "--steps", "2", "--warmup", "1", "--rounds", "1", "--threads", "1", "--out", str(out)],
                            timeout=600, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["variant"]: r for r in harness.read_csv(out, bench_trl.FIELDS)}
    if importlib.util.find_spec("trl") is None:
        assert bench_trl.TRL_MISSING in result.stderr
        assert rows.keys() == {"fastprocon-off", "fastprocon-procon"}
    else:
        assert rows.keys() == set(bench_trl.VARIANTS)
    for r in rows.values():
        assert float(r["real_tokens_per_s"]) > 0 and (r["batch"], r["micro_batch"]) == ("8", "4")
    assert rows["fastprocon-off"]["vs_fastprocon_off"] == "1.000"

