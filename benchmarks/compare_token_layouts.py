"""Why the tokenized-data cache is a flat token file and not Arrow: the two layouts measured side by side.

The same synthetic tokenized set (``--samples`` samples of 100-560 int32 tokens, ids, prompt
lengths) is written (a) as the flat layout of fastprocon/data/cache.py (one token array + int64
offsets, read through numpy memory maps, as fastprocon.utils.mapped does) and (b) as an Arrow IPC
file (list<int32> + string columns, the format under Hugging Face ``datasets``, read zero-copy
from a memory map). Measured in one process, interleaved: write time, open time, the time to
materialise one random sample as Python lists (what collate needs; Arrow both through
``as_py()`` and through its offsets/values buffers), and the resident-memory growth.

Needs numpy and pyarrow only (pyarrow is not a fastprocon dependency: run it in any venv that
has it):

    python benchmarks/compare_token_layouts.py --samples 200000
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def chunks(n: int, seed: int = 0, size: int = 10_000):
    rng = np.random.default_rng(seed)
    for start in range(0, n, size):
        m = min(size, n - start)
        lengths = rng.integers(100, 561, m)
        tokens = rng.integers(0, 49152, int(lengths.sum()), dtype=np.int32)
        ids = [f"rows:{i:012x}" for i in range(start, start + m)]
        yield lengths, tokens, ids, (lengths // 3).astype(np.int32)


def write_flat(d: Path, n: int) -> None:
    offsets, prompt, total = [np.zeros(1, np.int64)], [], 0
    with open(d / "tokens.bin", "wb") as f:
        for lengths, tokens, _ids, p in chunks(n):
            tokens.tofile(f)
            offsets.append(total + np.cumsum(lengths))
            total += int(lengths.sum())
            prompt.append(p)
    np.save(d / "offsets.npy", np.concatenate(offsets))
    np.save(d / "prompt.npy", np.concatenate(prompt))


def open_flat(d: Path):
    offsets = np.load(d / "offsets.npy")
    tokens = np.memmap(d / "tokens.bin", dtype=np.int32, mode="r")
    prompt = np.load(d / "prompt.npy")
    return lambda i: (tokens[offsets[i]:offsets[i + 1]].tolist(), int(prompt[i]))


def write_arrow(d: Path, n: int) -> None:
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("prompt_length", pa.int32())])
    with pa.OSFile(str(d / "data.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for lengths, tokens, ids, p in chunks(n):
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens))
            writer.write_batch(pa.record_batch([pa.array(ids), column, pa.array(p)], schema=schema))


def open_arrow(d: Path, mode: str):
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(d / "data.arrow"), "r")).read_all()
    column, prompt = table.column("input_ids"), table.column("prompt_length")
    starts = np.concatenate([[0], np.cumsum([len(c) for c in column.chunks])])
    if mode == "as_py":
        return lambda i: (column[i].as_py(), prompt[i].as_py())

    def get(i):
        k = int(np.searchsorted(starts, i, side="right") - 1)
        chunk, j = column.chunk(k), i - starts[k]
        off = chunk.offsets
        a, b = off[j].as_py(), off[j + 1].as_py()
        return chunk.values.slice(a, b - a).to_numpy().tolist(), prompt.chunk(k)[j].as_py()
    return get


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--reads", type=int, default=5000)
    p.add_argument("--tmp", default=None)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="layouts.", dir=args.tmp))
    try:
        times = {}
        for name, write in (("flat", write_flat), ("arrow", write_arrow)):
            d = tmp / name
            d.mkdir()
            t = time.perf_counter()
            write(d, args.samples)
            times[name] = time.perf_counter() - t
            size = sum(f.stat().st_size for f in d.iterdir())
            print(f"{name:12} write {times[name]:6.1f} s, {size / 2**20:.0f} MiB")
        picks = random.Random(0).choices(range(args.samples), k=args.reads)
        readers = {}
        for name, opener in (("flat", lambda: open_flat(tmp / "flat")),
                             ("arrow.as_py", lambda: open_arrow(tmp / "arrow", "as_py")),
                             ("arrow.buffers", lambda: open_arrow(tmp / "arrow", "buffers"))):
            before = rss()
            t = time.perf_counter()
            readers[name] = (opener(), before)
            print(f"{name:14} open {1e3 * (time.perf_counter() - t):8.1f} ms, rss +{(rss() - before) / 2**20:.1f} MiB")
        assert readers["flat"][0](7)[0] == readers["arrow.as_py"][0](7)[0] == readers["arrow.buffers"][0](7)[0]
        per = {name: [] for name in readers}
        for rnd in range(5):                          # interleaved rounds
            for name, (get, _) in readers.items():
                t = time.perf_counter()
                for i in picks[rnd::5]:
                    get(i)
                per[name].append((time.perf_counter() - t) / len(picks[rnd::5]) * 1e6)
        for name, (_, before) in readers.items():
            print(f"{name:14} read one sample: median {statistics.median(per[name]):7.1f} us "
                  f"(rounds {', '.join(f'{x:.1f}' for x in per[name])})")
        print(f"rss after all reads +{(rss() - min(b for _, b in readers.values())) / 2**20:.1f} MiB "
              f"(file pages touched by {args.reads} x 3 reads included)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
