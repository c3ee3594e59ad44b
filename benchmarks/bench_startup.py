"""Start-up memory of a model that is sharded over processes: today's path against the new one.

A random Llama of ~0.5 B parameters (bf16 safetensors in several files, written once to a cache
directory, never to the repository) is started by 2 processes under torchrun (gloo, CPU) the
way the trainer starts it, up to the end of the first optimizer step (LoRA on q/k/v/o, so the
optimizer state is small):

* ``from_pretrained``: every process loads the whole model in fp32 with ``from_pretrained``
  (and fingerprints it), then LoRA and ``fully_shard`` (the start-up before fastprocon.models.loading);
* ``sharded``: ``fastprocon.models.load.load_model`` with LoRA and ``fully_shard`` applied on the
  meta device, then each process reads only its shards (fastprocon.models.loading).

Per process: the peak resident set from launch to the end of the first step (``ru_maxrss``,
which includes the interpreter and torch, ~0.4 GiB, and the pages of the memory-mapped
safetensors files a process touched), its growth over the resident set after the imports, and
the peak up to the end of the load (before the step). As for every CPU memory figure here,
glibc's mmap threshold is fixed at 64 KiB first (benchmarks/harness.py), so a freed tensor
leaves the resident set; with glibc's default dynamic threshold, freed blocks under 32 MiB
(a layer's gathered weights, each file slice read) stay resident and the high-water mark
measures the allocator's cache too (FASTPROCON_BENCH_GLIBC_DEFAULT=1 measures that way).
The two paths alternate (``--rounds``) in one run, so both see the same
machine load; the load average is recorded with each row. Target: sharded <= 0.6 x today's peak.

    python benchmarks/bench_startup.py                   # writes benchmarks/results/startup_cpu.csv
    python benchmarks/bench_startup.py --layers 2 --hidden 64 --inter 128 --vocab 512 --rounds 1   # toy
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

FIELDS = (*harness.ENV_FIELDS, "path", "round", "processes", "params_m", "file_mib", "peak_rss_mib",
          "growth_mib", "baseline_mib", "load_peak_mib", "seconds", "load_avg_1m")
PATHS = ("from_pretrained", "sharded")


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The random Llama's shape, the process count and where the model is written (shared with bench_export)."""
    p.add_argument("--layers", type=int, default=17)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--inter", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model-dir", help="where the random model is written once (default: under $FASTPROCON_CACHE "
                                       "or ~/.cache/fastprocon/bench)")


def model_directory(args) -> Path:
    """--model-dir, or a cache directory named by the shape (its parent made)."""
    from fastprocon.models.specs import cache_root

    shape = f"llama-l{args.layers}-h{args.hidden}-i{args.inter}-v{args.vocab}-bf16"
    directory = Path(args.model_dir) if args.model_dir else cache_root().parent / "bench" / shape
    directory.parent.mkdir(parents=True, exist_ok=True)
    return directory


def write_model(directory: Path, args) -> int:
    """A random Llama saved as bf16 safetensors in files of <= 256 MB (with an index), once.
    Returns the parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fastprocon.models.specs import tiny_tokenizer

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=max(1, args.heads // 4), tie_word_embeddings=False,
                         pad_token_id=0, eos_token_id=1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    if (directory / "config.json").is_file():
        return n
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)                            # norms
            else:
                p.normal_(0, 0.02, generator=generator)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory.parent))
    model.save_pretrained(staging, max_shard_size="256MB")
    tiny_tokenizer().save_pretrained(staging)
    os.replace(staging, directory)
    return n


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(path: str, directory: str, out: str) -> None:
    """One process of a start-up: load by ``path``, LoRA + FSDP2, one optimizer step; rank 0 writes
    every rank's figures to ``out``."""
    import torch.distributed as dist

    from fastprocon.distributed.sharding import shard_model
    from fastprocon.models.layers import decoder_layers
    from fastprocon.models.load import load_model
    from fastprocon.train import load_config
    from fastprocon.train.prepare import apply_lora

    if os.environ.get("FASTPROCON_BENCH_GLIBC_DEFAULT") != "1":
        harness.prepare_cpu_memory_measurement()   # freed tensors leave the resident set (harness docstring)
    baseline = _rss_mib()   # after the imports: interpreter, torch, transformers
    t0 = time.perf_counter()
    dist.init_process_group("gloo")
    cfg = load_config("tiny", ["model.lora=true", "model.lora_rank=8"])

    def wrap(model):
        model = apply_lora(cfg, model)
        shard_model(model, decoder_layers(model), None)
        return model

    if path == "sharded":
        model = load_model(directory, wrap=wrap, seed=cfg.train.seed).model
    else:   # today's start-up: the whole fp32 model on every process, fingerprinted, then sharded
        from transformers import AutoModelForCausalLM

        from fastprocon.models.load import model_fingerprint
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        model_fingerprint(model)
        model = wrap(model)
    loaded_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(2, 200, (1, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    row = {"peak_rss_mib": peak, "growth_mib": peak - baseline, "baseline_mib": baseline, "load_peak_mib": loaded_peak,
           "seconds": time.perf_counter() - t0}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    del model, optimizer, params
    dist.barrier()
    dist.destroy_process_group()


def launch(path: str, directory: Path, nproc: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={port}", __file__, "--worker", path, str(directory), str(out)],
                       check=True, env=env)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(*argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arguments(p)
    p.add_argument("--rounds", type=int, default=2, help="alternating from_pretrained/sharded start-ups (default 2)")
    p.add_argument("--out", default=str(harness.RESULTS_DIR / "startup_cpu.csv"))
    args = p.parse_args(argv)
    directory = model_directory(args)
    n_params = write_model(directory, args)
    file_mib = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20
    print(f"model {directory}: {n_params / 1e6:.1f} M parameters, {file_mib:.0f} MiB of bf16 safetensors in "
          f"{len(list(directory.glob('*.safetensors')))} files")
    env = harness.environment(torch.device("cpu"), "benchmarks/bench_startup.py", argv)
    rows = []
    for r in range(args.rounds):
        for path in PATHS:
            load = os.getloadavg()[0]
            for rank_row in launch(path, directory, args.nproc):
                rows.append({**env, "path": path, "round": r, "processes": args.nproc,
                             "params_m": round(n_params / 1e6, 1), "file_mib": round(file_mib),
                             **{k: round(v, 1) for k, v in rank_row.items()}, "load_avg_1m": round(load, 2)})
                print({k: rows[-1][k] for k in ("path", "round", "peak_rss_mib", "growth_mib", "seconds")})
    peak = {path: max(row["peak_rss_mib"] for row in rows if row["path"] == path) for path in PATHS}
    growth = {path: max(row["growth_mib"] for row in rows if row["path"] == path) for path in PATHS}
    summary = (f"peak RSS per process (max over processes and rounds): from_pretrained {peak['from_pretrained']:.0f} "
               f"MiB, sharded {peak['sharded']:.0f} MiB: ratio {peak['sharded'] / peak['from_pretrained']:.2f} "
               f"(target <= 0.6); growth after imports {growth['from_pretrained']:.0f} -> {growth['sharded']:.0f} MiB "
               f"(ratio {growth['sharded'] / growth['from_pretrained']:.2f})")
    harness.save_rows(Path(args.out), rows, FIELDS, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
