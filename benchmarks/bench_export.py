"""Peak memory per process of the final export: the rank-0 gather against the sharded export.

A random Llama (bf16 safetensors, written once to a cache directory as in bench_startup.py; the
default shape is that benchmark's ~0.5 B one) is loaded by ``--nproc`` processes under torchrun
(gloo, CPU) the way the trainer holds it: fp32 master weights, FSDP2-sharded. Then, measured:

* ``gather``: the export before sharded writing: the full fp32 state dict gathered on rank 0
  (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), a fresh full copy of the
  model loaded there, the gathered weights loaded into it and ``save_pretrained``;
* ``sharded``: ``fastprocon.train.export.export_model``: every process writes its own shards
  (DCP's ``HuggingFaceStorageWriter``), then the processes consolidate them into the HF files.

Per process: the growth of the resident set's high-water mark during the export over the
resident set just before it (``/proc/self/clear_refs`` resets the mark; glibc's mmap threshold
is fixed first, see benchmarks/harness.py), against the fp32 model size. Target for the
sharded export: at most model / processes plus a constant. Both exports are checked to hold the
same tensors. The paths alternate (``--rounds``); the load average is recorded with each row.

    python benchmarks/bench_export.py                                   # ~0.5 B, 2 processes
    python benchmarks/bench_export.py --layers 2 --hidden 64 --inter 128 --vocab 512 --heads 4 --rounds 1   # toy
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_startup import model_arguments, model_directory, write_model  # noqa: E402

FIELDS = (*harness.ENV_FIELDS, "path", "round", "rank", "processes", "params_m", "model_fp32_mib", "before_mib",
          "export_growth_mib", "growth_over_share", "seconds", "load_avg_1m")
PATHS = ("gather", "sharded")


def worker(path: str, directory: str, out_dir: str, result: str) -> None:
    """One process: load the model sharded (fp32), export it by ``path``, report the export's peak."""
    import torch.distributed as dist

    from fastprocon.distributed.sharding import shard_for_inference
    from fastprocon.models.load import load_model
    from fastprocon.train.checkpoint import full_model_state_dict
    from fastprocon.train.export import export_model

    harness.prepare_cpu_memory_measurement()
    dist.init_process_group("gloo")
    loaded = load_model(directory, dtype=torch.float32, wrap=shard_for_inference)
    cpu = torch.device("cpu")
    dist.barrier()
    before = harness.current_bytes(cpu)
    harness.reset_peak(cpu)
    t0 = time.perf_counter()
    if path == "sharded":
        export_model(loaded.model, loaded.tokenizer, Path(out_dir), None)
    else:   # the export as it was: everything on rank 0
        full = full_model_state_dict(loaded.model)
        if dist.get_rank() == 0:
            fresh = load_model(directory, dtype=torch.float32)
            fresh.model.load_state_dict(full)
            fresh.model.save_pretrained(out_dir)
            fresh.tokenizer.save_pretrained(out_dir)
            del fresh
        del full
        dist.barrier()
    row = {"before_mib": before / 2**20, "export_growth_mib": (harness.peak_bytes(cpu) - before) / 2**20,
           "seconds": time.perf_counter() - t0}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps(rows))
    del loaded
    dist.barrier()
    dist.destroy_process_group()


def launch(path: str, directory: Path, out_dir: Path, nproc: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={port}", __file__, "--worker", path, str(directory), str(out_dir),
                        str(result)], check=True, env=env)
        return json.loads(result.read_text())


def same_tensors(a: Path, b: Path) -> None:
    """The two exports hold the same tensors (names, values), whatever their file layout."""
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for file in sorted(directory.glob("model*.safetensors")):
            with safe_open(str(file), "pt") as f:
                found.update({key: (file, key) for key in f.keys()})
        return found

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        raise RuntimeError(f"the exports differ in their tensors: {sorted(ta.keys() ^ tb.keys())[:5]}")
    for key in ta:
        with safe_open(str(ta[key][0]), "pt") as fa, safe_open(str(tb[key][0]), "pt") as fb:
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                raise RuntimeError(f"the exports differ in tensor {key}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(*argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arguments(p)
    p.add_argument("--rounds", type=int, default=1, help="alternating gather/sharded exports (default 1)")
    p.add_argument("--out", default=str(harness.RESULTS_DIR / "export_cpu.csv"))
    args = p.parse_args(argv)
    directory = model_directory(args)
    n_params = write_model(directory, args)
    fp32_mib = 4 * n_params / 2**20
    print(f"model {directory}: {n_params / 1e6:.1f} M parameters ({fp32_mib:.0f} MiB in fp32)")
    env = harness.environment(torch.device("cpu"), "benchmarks/bench_export.py", argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastprocon-export-") as scratch:
        for r in range(args.rounds):
            for path in PATHS:
                out_dir = Path(scratch) / path
                shutil.rmtree(out_dir, ignore_errors=True)
                load = os.getloadavg()[0]
                for rank, rank_row in enumerate(launch(path, directory, out_dir, args.nproc)):
                    growth = rank_row["export_growth_mib"]
                    rows.append({**env, "path": path, "round": r, "rank": rank, "processes": args.nproc,
                                 "params_m": round(n_params / 1e6, 1), "model_fp32_mib": round(fp32_mib),
                                 **{k: round(v, 1) for k, v in rank_row.items()},
                                 "growth_over_share": round(growth / (fp32_mib / args.nproc), 2),
                                 "load_avg_1m": round(load, 2)})
                    print({k: rows[-1][k] for k in ("path", "round", "rank", "export_growth_mib", "seconds")})
            same_tensors(Path(scratch) / "gather", Path(scratch) / "sharded")
    peak = {path: max(row["export_growth_mib"] for row in rows if row["path"] == path) for path in PATHS}
    summary = (f"{n_params / 1e6:.0f} M parameters ({fp32_mib:.0f} MiB fp32) on {args.nproc} processes: peak growth of "
               f"the resident set during the export, max over processes: rank-0 gather {peak['gather']:.0f} MiB, "
               f"sharded {peak['sharded']:.0f} MiB (model / processes = {fp32_mib / args.nproc:.0f} MiB); "
               "the same tensors in both exports")
    harness.save_rows(Path(args.out), rows, FIELDS, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
