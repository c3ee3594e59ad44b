"""Benchmark the data path at scale under torchrun: the tokenized-data cache and the z0 cache.

Everything runs as 2 processes (``torchrun --nproc_per_node 2``, gloo on CPU), each measuring
itself; the parent collects the rows into one CSV.

* data: a synthetic JSONL set of ``--rows`` alpaca rows (default 1 M; written to a temporary
  directory) goes through ``fastprocon.data.cache.load_training_set`` as the trainer calls it:
  first start (cache miss: rank 0 tokenizes and writes the cache while rank 1 waits), then a
  second start (cache hit). After loading, each process materialises its micro-batches of
  ``--steps`` optimizer steps (the trainer's StepBatches). Tokenizer: ``--tokenizer tiny`` (the
  test model's byte-level tokenizer, a Rust ``PreTrainedTokenizerFast``, ChatML template) or
  ``smollm2`` (SmolLM2-135M-Instruct's BPE tokenizer, needs the converted model cache).
  TOKENIZERS_PARALLELISM=false unless set: on the loaded 2-core machine the tokenizer's own
  threads made a 4000-text batch 2.4x slower (9.0 s against 3.8 s, load average ~18).
* z0: a reference cache of ``--z0-samples`` samples (default 200 k; ``--z0-layers`` layers,
  16-80 response tokens each, random values) is written the way a torchrun build writes it
  (each process its own token-major shard, then rank 0 the index), then each process opens it
  and gathers ``--z0-batches`` random micro-batches of ``--z0-micro`` samples.

Memory per process, from /proc/self/status, above what the process held just before the
measured part began (after imports and the tokenizer): ``rss`` (VmRSS growth, includes
file-backed pages of the memory maps that were touched; the kernel can drop those at will and
they are shared between the processes of a node), ``anon`` (RssAnon growth: private memory the
process allocated) and ``peak`` (VmHWM growth: the high-water mark of the resident set during
the part, reset through /proc/self/clear_refs). The machine's 1-minute load average is recorded
with each row: figures measured on a shared machine are only as steady as it is.

    python benchmarks/bench_data.py                                   # 1 M rows, 200 k z0 samples
    python benchmarks/bench_data.py --rows 20000 --z0-samples 5000    # a quick run
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np

FIELDS = harness.ENV_FIELDS + (
    "part", "phase", "rank", "world", "tokenizer", "samples", "tokens", "seconds", "per_batch_ms", "p20_ms", "p80_ms",
    "rss_growth_bytes", "anon_growth_bytes", "peak_growth_bytes", "file_bytes", "load_avg")
DEFAULT_OUT = harness.RESULTS_DIR / "data_cpu.csv"
WORDS = ("the of and to in is for on that with as by at from this be are it an or was which model data "
         "train value step layer token refusal safety answer question number compute result sum add").split()


def status() -> dict:
    keys = ("VmRSS", "RssAnon", "VmHWM")
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in keys:
                found[key] = int(line.split()[1]) * 1024
    return found


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def growth(before: dict) -> dict:
    now = status()
    return {"rss_growth_bytes": now["VmRSS"] - before["VmRSS"], "anon_growth_bytes": now["RssAnon"] - before["RssAnon"],
            "peak_growth_bytes": now["VmHWM"] - before["VmRSS"]}


def load_avg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """``n`` alpaca rows of random words (prompts 8-40 words, responses 10-60 words)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
            response = " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))
            f.write(json.dumps({"instruction": f"{i}: {prompt}?", "output": response + "."}) + "\n")


def tokenizer_of(name: str):
    from fastprocon.models.load import load_model
    from fastprocon.models.specs import tiny_tokenizer
    if name == "tiny":
        return tiny_tokenizer()
    return load_model(name).tokenizer


# ---------------------------------------------------------------------------------------------
# workers (one per process, under torchrun)


def data_worker(args, dist) -> dict:
    from fastprocon.data.cache import load_training_set
    from fastprocon.train.batches import StepBatches

    tok = tokenizer_of(args.tokenizer)
    dist.barrier()
    before = status()
    reset_peak()
    start = time.perf_counter()
    data = load_training_set(Path(args.dir) / "rows.jsonl", tok, args.max_length,
                             cache_dir=Path(args.dir) / "cache")
    dist.barrier()
    seconds = time.perf_counter() - start
    batches = StepBatches(data, batch_size=args.batch, micro_batch_size=args.batch // dist.get_world_size(),
                          world_size=dist.get_world_size(), rank=dist.get_rank(), seed=0, pad_id=0)
    for step in range(args.steps):
        batches.micro_batches(step)
    return {"samples": len(data), "tokens": int(data.lengths.sum()), "seconds": seconds,
            "file_bytes": data.path.stat().st_size, **growth(before)}


def z0_build_worker(args, dist) -> dict:
    import torch

    from fastprocon.procon.reference_files import write_index, write_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    layers = list(range(1, args.z0_layers + 1))
    header = {"model_fingerprint": "bench", "directions_hash": "bench", "dataset_hash": "bench", "max_length": 512,
              "layers": layers, "storage_dtype": args.z0_dtype, "build_id": "bench"}
    gen = torch.Generator().manual_seed(rank)

    def batches():
        for start in range(rank, args.z0_samples, world * 64):
            ids = [f"bench:{i:012x}" for i in range(start, min(start + world * 64, args.z0_samples), world)]
            counts = torch.randint(16, 81, (len(ids),), generator=gen).tolist()
            yield ids, [torch.randn(len(layers), c, generator=gen) for c in counts]

    dist.barrier()
    before = status()
    reset_peak()
    start = time.perf_counter()
    write_shard(Path(args.dir) / "z0.safetensors", batches(), header, rank, world)
    dist.barrier()
    size = write_index(Path(args.dir) / "z0.safetensors", world) if rank == 0 else 0
    dist.barrier()
    return {"samples": args.z0_samples, "tokens": 0, "seconds": time.perf_counter() - start, "file_bytes": size,
            **growth(before)}


def z0_gather_worker(args, dist) -> dict:
    import torch

    from fastprocon.procon.reference import ReferenceCache

    rank = dist.get_rank()
    rng = np.random.default_rng(100 + rank)
    picks = [rng.choice(args.z0_samples, args.z0_micro, replace=False) for _ in range(args.z0_batches)]
    dist.barrier()
    before = status()
    reset_peak()
    start = time.perf_counter()
    cache = ReferenceCache.load(Path(args.dir) / "z0.safetensors", model_fingerprint="bench", directions_hash="bench",
                                dataset_hash="bench", max_length=512, layers=None)
    open_s = time.perf_counter() - start
    times, n_tokens = [], 0
    for pick in picks:
        ids = [f"bench:{int(i):012x}" for i in pick]
        t = time.perf_counter()
        shards, rows, _ = cache.files.locate(ids)    # response counts as the trainer's labels would give them
        counts = [cache.files.count(s, r) for s, r in zip(shards, rows)]
        labels = torch.full((len(ids), max(counts) + 4), -100)
        for b, c in enumerate(counts):
            labels[b, 4:4 + c] = 1
        out = cache.gather(ids, labels)
        times.append((time.perf_counter() - t) * 1e3)
        n_tokens += sum(counts)
        del out
    timing = harness.quantiles(times)
    return {"samples": len(cache), "tokens": n_tokens, "seconds": open_s, "per_batch_ms": timing.median_ms,
            "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "file_bytes": 0, **growth(before)}


WORKERS = {"data": data_worker, "z0-build": z0_build_worker, "z0-gather": z0_gather_worker}


def worker_main(args) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        row = WORKERS[args.worker](args, dist)
        row.update(rank=dist.get_rank(), world=dist.get_world_size(), load_avg=load_avg())
        Path(args.result).with_suffix(f".rank{dist.get_rank()}.json").write_text(json.dumps(row))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, worker: str, tmp: Path, nproc: int) -> list[dict]:
    result = tmp / f"{worker}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(Path(__file__).resolve()), "--worker", worker, "--result", str(result), "--dir", str(tmp),
           *_forwarded(args)]
    env = {"TOKENIZERS_PARALLELISM": "false", **os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(cmd, check=True, env=env)
    rows = [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(nproc)]
    for r in range(nproc):
        result.with_suffix(f".rank{r}.json").unlink()
    return rows


def _forwarded(args) -> list[str]:
    return ["--tokenizer", args.tokenizer, "--max-length", str(args.max_length), "--batch", str(args.batch),
            "--steps", str(args.steps), "--z0-samples", str(args.z0_samples), "--z0-layers", str(args.z0_layers),
            "--z0-dtype", args.z0_dtype, "--z0-batches", str(args.z0_batches), "--z0-micro", str(args.z0_micro)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rows-file", type=Path, default=None,
                   help="reuse this JSONL (an earlier run's synthetic rows, e.g.) instead of writing one")
    p.add_argument("--tokenizer", choices=("tiny", "smollm2"), default="tiny")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="global batch (samples per optimizer step)")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps whose micro-batches each process builds")
    p.add_argument("--z0-samples", type=int, default=200_000)
    p.add_argument("--z0-layers", type=int, default=29)
    p.add_argument("--z0-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--z0-batches", type=int, default=500)
    p.add_argument("--z0-micro", type=int, default=8, help="samples per gathered micro-batch")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--parts", nargs="+", choices=("data", "z0"), default=["data", "z0"])
    p.add_argument("--tmp", default=None, help="working directory (default: a new temporary one, removed after)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)

    import torch
    env = harness.environment(torch.device("cpu"), "benchmarks/bench_data.py", sys.argv[1:] if argv is None else argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data.", dir=args.tmp))
    rows = []

    def add(part, phase, results, **extra):
        for r in results:
            rows.append({**env, "part": part, "phase": phase, "tokenizer": args.tokenizer if part == "data" else "",
                         "per_batch_ms": "", "p20_ms": "", "p80_ms": "", **r, **extra})
            per_batch = "" if r.get("per_batch_ms") in (None, "") else f", {r['per_batch_ms']:.3f} ms/batch"
            print(f"{part:5} {phase:13} rank {r['rank']}: {r['seconds']:8.2f} s{per_batch}, "
                  f"rss +{r['rss_growth_bytes'] / 2**20:.0f} MiB, anon +{r['anon_growth_bytes'] / 2**20:.0f} MiB, "
                  f"peak +{r['peak_growth_bytes'] / 2**20:.0f} MiB (load {r['load_avg']:.1f})", flush=True)

    try:
        if "data" in args.parts:
            t = time.perf_counter()
            if args.rows_file:
                os.symlink(args.rows_file.resolve(), tmp / "rows.jsonl")
            else:
                write_rows(tmp / "rows.jsonl", args.rows)
            print(f"{'linked' if args.rows_file else 'wrote'} {args.rows} rows "
                  f"({(tmp / 'rows.jsonl').stat().st_size / 2**20:.0f} MiB) in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
            first = launch(args, "data", tmp, args.nproc)
            add("data", "first start", first)
            second = launch(args, "data", tmp, args.nproc)
            add("data", "second start", second)
            ratio = max(r["seconds"] for r in first) / max(r["seconds"] for r in second)
            print(f"second start {ratio:.1f}x faster than the first", flush=True)
            (tmp / "rows.jsonl").unlink()
            shutil.rmtree(tmp / "cache")
        if "z0" in args.parts:
            add("z0", "build", launch(args, "z0-build", tmp, args.nproc))
            add("z0", "gather", launch(args, "z0-gather", tmp, args.nproc))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        row.setdefault("file_bytes", 0)
    harness.write_csv(args.out, rows, FIELDS)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
