"""Shared measurement helpers for the benchmarks: timing, peak extra memory, environment, CSV.

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls); on CPU,
repeated wall clock after a warm-up. Both give the median with the 20th and 80th percentiles.

Peak extra memory (bytes allocated at the peak of a call, above what was allocated when it
started):
  - CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` minus
    ``memory_allocated`` before the call (the caching allocator's exact count).
  - CPU: the process's resident-set high-water mark. Linux resets VmHWM to the current RSS
    when "5" is written to /proc/self/clear_refs; the call's extra is then VmHWM - VmRSS(before).
    glibc's dynamic mmap threshold would keep freed large blocks resident (hiding later
    allocations that reuse them), so :func:`prepare_cpu_memory_measurement` fixes the
    threshold at 64 KiB: every tensor-sized block is its own mapping, returned on free.
    That also makes every allocation page-fault afresh, which would slow timed calls, so
    CPU memory is measured in a separate process (:func:`memory_pass_subprocess`).
    Resolution is one page plus whatever else the process touches meanwhile (small: the
    median of a few repeats is reported). This sees every allocation, torch's or a BLAS
    library's scratch; tracemalloc would see none of torch's.
"""
from __future__ import annotations

import csv
import ctypes
import ctypes.util
import functools
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import torch

import fastprocon
from fastprocon.models.load import resolve_device
from fastprocon.utils.io import atomic_path, write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Columns describing where a row was measured; every benchmark CSV starts with them.
ENV_FIELDS = ("machine", "device", "torch", "triton", "transformers", "command")

_MMAP_THRESHOLD_BYTES = 64 * 1024
_M_MMAP_THRESHOLD = -3           # glibc mallopt parameter number


class Timing(NamedTuple):
    median_ms: float
    p20_ms: float
    p80_ms: float


# ---------------------------------------------------------------------------------------------
# environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _without_out(argv: Sequence[str]) -> list[str]:
    """argv less its ``--out PATH`` (where a run writes does not change what it measures)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return kept


def environment(device: torch.device, script: str, argv: Sequence[str]) -> dict:
    """The ENV_FIELDS of a result row: CPU model and cores, device name, library versions, and
    the command line that reproduces it (``script`` relative to the repository root; without
    ``--out``, so it writes to the default results path)."""
    import triton
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = ""
    threads = torch.get_num_threads()
    return {
        "machine": f"{_cpu_model()} ({os.cpu_count()} cpus, {threads} torch threads)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": tf_version,
        "command": shlex.join(["python", script, *_without_out(argv)]),
    }


def device_tag(device: torch.device) -> str:
    """Short file-name tag: "cpu", or the card's name as a slug (e.g. "nvidia-h100-80gb-hbm3")."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# timing


def quantiles(samples_ms: Sequence[float]) -> Timing:
    """Median, 20th and 80th percentiles (linear interpolation) of a list of times."""
    if not samples_ms:
        raise ValueError("no timing samples")
    if len(samples_ms) == 1:
        return Timing(samples_ms[0], samples_ms[0], samples_ms[0])
    cuts = statistics.quantiles(samples_ms, n=10, method="inclusive")   # deciles
    return Timing(statistics.median(samples_ms), cuts[1], cuts[7])


def bench_time(fn: Callable[[], object], device: torch.device, *, warmup_ms: float, rep_ms: float,
               min_reps: int = 5, grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> Timing:
    """Time ``fn``. ``grad_to_none`` tensors get ``.grad = None`` before each call (untimed), so
    gradient accumulation does not add a pass. CUDA: do_bench's own warm-up/rep budgets in ms."""
    if device.type == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)

    def call() -> float:
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    spent = call()                       # at least one warm-up call (compilation, first touch)
    while spent < warmup_ms:
        spent += call()
    samples: list[float] = []
    while len(samples) < min_reps or sum(samples) < rep_ms:
        samples.append(call())
    return quantiles(samples)


# ---------------------------------------------------------------------------------------------
# memory


def prepare_cpu_memory_measurement() -> None:
    """Fix glibc's mmap threshold (see the module docstring). Call once, before measuring."""
    libc_name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or libc_name is None:
        raise RuntimeError("CPU peak-memory measurement needs Linux with glibc (/proc/self/clear_refs)")
    libc = ctypes.CDLL(libc_name)
    if libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: is this glibc?")


def _proc_status_bytes(*keys: str) -> dict:
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in keys:
                found[key] = int(line.split()[1]) * 1024      # reported in kB
    return found


def releases_memory(fn: Callable) -> Callable:
    """Decorate a function that builds a model: once it returns (its locals gone), collect the
    reference cycles a model sits in and empty CUDA's cache, so the next model's peak is its own."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return wrapper


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator peak, or the CPU RSS high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def current_bytes(device: torch.device) -> int:
    """Bytes in use now: CUDA allocated bytes, or the CPU resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS")["VmRSS"]


def peak_bytes(device: torch.device) -> int:
    """Peak bytes in use since :func:`reset_peak`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")["VmHWM"]


def peak_extra_bytes(fn: Callable[[], object], device: torch.device, *, repeats: int = 3,
                     before: Optional[Callable[[], None]] = None) -> int:
    """Peak bytes in use during ``fn()`` above those in use when it started (see the module
    docstring for how, per device). Whatever ``fn`` returns is kept alive until the peak is
    read, then dropped. ``before`` runs (unmeasured) ahead of each repeat, e.g. to clear .grad.
    The median over ``repeats`` calls is returned (a single call on CUDA, where it is exact)."""
    results = []
    for _ in range(1 if device.type == "cuda" else repeats):
        if before is not None:
            before()
        synchronize(device)
        base = current_bytes(device)
        reset_peak(device)
        kept = fn()
        synchronize(device)
        results.append(peak_bytes(device) - base)
        del kept
    return int(statistics.median(results))


# ---------------------------------------------------------------------------------------------
# CSV


def start(args) -> torch.device:
    """The device of a benchmark's ``--device``, with its ``--threads`` applied."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def memory_pass(out: Path, measure: Callable[[], list]) -> int:
    """The child side of :func:`memory_pass_subprocess`: fix the mmap threshold, run ``measure``
    (the benchmark's rows with their memory only) and write them to ``out``. In its own process
    because the fixed threshold makes every allocation page-fault afresh, which would slow the
    timed calls."""
    prepare_cpu_memory_measurement()
    write_json(out, measure())
    return 0


def save_rows(out: Path, rows: list[dict], fields: Sequence[str], summary: str) -> None:
    """Write the final CSV and print the summary table and where the rows went."""
    write_csv(out, rows, fields)
    print(summary)
    print(f"wrote {len(rows)} rows to {out}")


def memory_pass_subprocess(script: Path, argv: Sequence[str]) -> list:
    """Run ``script argv --memory-pass <tmp.json>`` in a fresh interpreter and return the JSON it
    wrote: CPU peak memory is measured away from the timed process (see the module docstring)."""
    # the child imports the fastprocon this process runs (a checkout on sys.path, not another install)
    root = str(Path(fastprocon.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        subprocess.run([sys.executable, str(script), *argv, "--memory-pass", str(out)], check=True, env=env)
        return json.loads(out.read_text())


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping], fields: Sequence[str]) -> Path:
    """Write ``rows`` (mappings with exactly ``fields``) as CSV, atomically."""
    path = Path(path)
    rows = list(rows)
    for i, row in enumerate(rows):
        if set(row) != set(fields):
            missing, extra = sorted(set(fields) - set(row)), sorted(set(row) - set(fields))
            raise ValueError(f"{path}: row {i} does not match the schema (missing {missing}, unexpected {extra})")
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields))
            writer.writeheader()
            writer.writerows(rows)
    return path


def read_csv(path: str | os.PathLike, fields: Sequence[str]) -> list[dict]:
    """Rows of a CSV written by :func:`write_csv`, checking its header against ``fields``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != list(fields):
            raise ValueError(f"{path}: header {reader.fieldnames} is not the expected schema {list(fields)}")
        return list(reader)


def fmt_bytes(n: float) -> str:
    """Human-readable byte count (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
