"""Peak GPU memory of loading a Llama-3-8B-shaped model through the sharded path, in bf16.

A random model with Llama-3-8B's shapes at full depth (32 layers, hidden 4096, vocab 128256,
untied) is written as bf16 safetensors (5 GB files plus an index; generated tensor by tensor
on the device, so the host never holds the model) to a temporary directory, then loaded by
``fastprocon.models.load.load_model`` on one GPU in bf16 with ``fully_shard`` (a 1-process group):
built on the meta device, then each tensor read from the memory-mapped files straight into its
parameter. Reported: the peak allocated GPU memory during the load against the bf16 parameter
size (the target: close to 1.0x, no second copy), the load time, and a forward's finite check.

    python benchmarks/bench_load_gpu.py                       # on a GPU (benchmarks/gpu_check.sh)
    python benchmarks/bench_load_gpu.py --toy --device cpu    # toy shapes (the smoke run)
    python benchmarks/bench_load_gpu.py --export              # and the export (export8b_<device>.csv)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

FIELDS = (*harness.ENV_FIELDS, "model", "params_b", "param_gib", "file_gib", "peak_gib", "peak_over_params",
          "write_s", "load_s")
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192)
TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256)
FILE_BYTES = 5 * 2**30
EXPORT_FIELDS = (*harness.ENV_FIELDS, "model", "params_b", "param_gib", "export_gib", "export_files",
                 "gpu_peak_gib", "host_peak_gib", "export_s")


def write_random_model(directory: Path, shapes: dict, device: torch.device) -> int:
    """Random bf16 safetensors files (+ index, config, tokenizer) for ``shapes``; returns the
    parameter count. Tensors are made on ``device`` one at a time and written file by file."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fastprocon.models.loading import INDEX_FILE
    from fastprocon.models.specs import tiny_tokenizer

    config = LlamaConfig(**shapes, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map, pending, pending_bytes, n_files, total = {}, {}, 0, 0, 0

    def flush() -> None:
        nonlocal pending, pending_bytes, n_files
        n_files += 1
        name = f"model-{n_files:05d}.safetensors"
        save_file(pending, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in pending})
        pending, pending_bytes = {}, 0

    for key, p in meta.named_parameters():
        if p.dim() == 1:
            value = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            value = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
            value = value.normal_(0, 0.02, generator=generator).cpu()
        pending[key] = value
        pending_bytes += value.numel() * 2
        total += value.numel()
        if pending_bytes >= FILE_BYTES:
            flush()
    if pending:
        flush()
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return total


def load_figures(device: torch.device, argv, args, n: int, file_gib: float, write_s: float, load_s: float,
                 peak: int) -> dict:
    """The load's CSV row, saved (and its summary printed); returned."""
    param_gib = 2 * n / 2**30
    row = {**harness.environment(device, "benchmarks/bench_load_gpu.py", argv),
           "model": "toy" if args.toy else "llama3-8b", "params_b": round(n / 1e9, 3),
           "param_gib": round(param_gib, 3), "file_gib": round(file_gib, 3), "peak_gib": round(peak / 2**30, 3),
           "peak_over_params": round(peak / 2**30 / param_gib, 3), "write_s": round(write_s, 1),
           "load_s": round(load_s, 1)}
    out = Path(args.out) if args.out else harness.RESULTS_DIR / f"load8b_{harness.device_tag(device)}.csv"
    harness.save_rows(out, [row], FIELDS,
                      f"{row['model']}: {row['params_b']} B parameters = {param_gib:.2f} GiB in bf16; peak "
                      f"{'GPU' if device.type == 'cuda' else 'resident'} memory of the sharded load "
                      f"{row['peak_gib']:.2f} GiB ({row['peak_over_params']:.2f}x), {load_s:.1f} s")
    return row


def measure_export(loaded, scratch: Path, device: torch.device) -> dict:
    """Export ``loaded`` (sharded, one process) into ``scratch``/export; its peak GPU and host memory
    above what the process held before, the time, and one tensor checked against the model."""
    import gc

    from safetensors import safe_open

    from fastprocon.train.export import export_model

    for weights in scratch.glob("*.safetensors"):   # read into the model already: free the disk for the export
        weights.unlink()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cpu = torch.device("cpu")
    gpu_base = harness.current_bytes(device) if device.type == "cuda" else 0
    host_base = harness.current_bytes(cpu)
    if device.type == "cuda":
        harness.reset_peak(device)
    harness.reset_peak(cpu)
    t0 = time.perf_counter()
    out = export_model(loaded.model, loaded.tokenizer, scratch / "export", None)
    harness.synchronize(device)
    export_s = time.perf_counter() - t0
    gpu_peak = harness.peak_bytes(device) - gpu_base if device.type == "cuda" else 0
    host_peak = harness.peak_bytes(cpu) - host_base
    index = json.loads((out / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    param = loaded.model.get_parameter(key)
    param = param.full_tensor() if hasattr(param, "full_tensor") else param
    with safe_open(str(out / index["weight_map"][key]), "pt") as f:
        if not torch.equal(f.get_tensor(key), param.detach().cpu()):
            raise RuntimeError(f"the export's {key} differs from the model's")
    files = sorted(set(index["weight_map"].values()))
    return {"export_gib": round(sum((out / f).stat().st_size for f in files) / 2**30, 3), "export_files": len(files),
            "gpu_peak_gib": round(gpu_peak / 2**30, 3), "host_peak_gib": round(host_peak / 2**30, 3),
            "export_s": round(export_s, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true", help="toy shapes (2 layers, hidden 64): the smoke run")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dir", help="scratch directory for the files (default: a temporary one, removed after)")
    p.add_argument("--out", help="CSV path (default benchmarks/results/load8b_<device>.csv)")
    p.add_argument("--export", action="store_true", help="then export the model the trainer's way (sharded)")
    p.add_argument("--export-out", help="its CSV (default benchmarks/results/export8b_<device>.csv)")
    args = p.parse_args(argv)
    device = harness.start(args)
    from fastprocon.distributed.process import init_distributed, shutdown
    from fastprocon.distributed.sharding import shard_for_inference
    from fastprocon.models.load import load_model

    shapes = TOY if args.toy else LLAMA3_8B
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fastprocon-8b-"))
    scratch.mkdir(parents=True, exist_ok=True)
    ctx = init_distributed(device.type)   # a 1-process group: the trainer's FSDP2 layout
    try:
        t0 = time.perf_counter()
        n = write_random_model(scratch, shapes, device)
        write_s = time.perf_counter() - t0
        file_gib = sum(f.stat().st_size for f in scratch.glob("*.safetensors")) / 2**30
        print(f"wrote {n / 1e9:.2f} B parameters ({file_gib:.1f} GiB bf16) to {scratch} in {write_s:.0f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        base = harness.current_bytes(device)
        harness.reset_peak(device)
        t0 = time.perf_counter()
        loaded = load_model(str(scratch), dtype=torch.bfloat16, device=device, wrap=shard_for_inference)
        harness.synchronize(device)
        load_s = time.perf_counter() - t0
        peak = harness.peak_bytes(device) - base
        with torch.no_grad():
            logits = loaded.model(torch.arange(2, 18, device=device)[None]).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("the loaded model's logits are not finite")
        del logits
        load_row = load_figures(device, argv, args, n, file_gib, write_s, load_s, peak)   # saved before the export
        if args.export:
            export_row = {**harness.environment(device, "benchmarks/bench_load_gpu.py", argv),
                          **{k: load_row[k] for k in ("model", "params_b", "param_gib")},
                          **measure_export(loaded, scratch, device)}
            out = Path(args.export_out) if args.export_out else \
                harness.RESULTS_DIR / f"export8b_{harness.device_tag(device)}.csv"
            where = "GPU" if device.type == "cuda" else "no GPU"
            harness.save_rows(out, [export_row], EXPORT_FIELDS,
                              f"{export_row['model']}: sharded export of {export_row['param_gib']:.2f} GiB ("
                              f"{export_row['export_files']} files, {export_row['export_gib']:.2f} GiB) in "
                              f"{export_row['export_s']:.1f} s; peak above the start: {where} "
                              f"{export_row['gpu_peak_gib']:.2f} GiB, host {export_row['host_peak_gib']:.2f} GiB")
        del loaded
    finally:
        shutdown(ctx)
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
