"""Benchmark end-to-end training steps: ProCon off, ProCon with the reference penalty, and the
fused penalty, at every decoder layer.

One step is the trainer's (fastprocon/train/trainer.py) on one process: ProConHooks armed with
the response mask, z0 [L, B, T] and scale = alpha / batch; model forward; CE sum over response
predictions / their count; backward (carrying the ProCon gradient through the hooks);
gradient clipping; fused AdamW; zero_grad. It is built here from the same public pieces
(fastprocon.procon.hooks, fastprocon.train.loss), without the trainer's data, reference-cache and
checkpoint machinery, so any model shape can be measured with no weights or data on disk.
Single device, no FSDP: with ``--dtype bf16`` the parameters, gradients and AdamW state are bf16
(activations are bf16 as under the trainer's FSDP2 bf16 mixed precision, but there is no fp32
master copy).
Batches are random tokens with the first 30% of every row as prompt (labels -100); directions
are random unit vectors and z0 random values: the cost does not depend on their values.

The variants share one model and optimizer and run interleaved, round by round (off, reference,
fused, off, ...), so slow drifts of a shared machine hit them alike. The overhead of a variant
is the median over rounds of (its step time / the same round's ProCon-off step time) - 1.
Peak memory over a step (parameters, gradients, optimizer state, activations): on CUDA
max_memory_allocated; on CPU the resident-set high-water mark, measured in a separate process
with glibc's mmap threshold fixed so the resident set follows live memory (see harness.py).
MFU (CUDA): tokens/s x (6 N + 12 L D T) / the card's dense bf16 peak (train.metrics), N = the
parameters that take part in matmuls (the input embedding is a lookup, unless tied to the head).

Models (``--models``, each optionally ``name:layers`` to keep only the first layers):
  smollm2        the real SmolLM2-135M-Instruct (fastprocon.models.load.load_model)
  smollm2-135m   random init, SmolLM2-135M shapes (30 layers, hidden 576, 9/3 heads, vocab 49152)
  llama3.2-1b    random init, Llama-3.2-1B shapes (16 layers, hidden 2048, 32/8 heads, vocab 128256)
  llama3-8b      random init, Llama-3-8B shapes (32 layers, hidden 4096, 32/8 heads, vocab 128256)
  tiny           the 4-layer test model (smoke runs)

    python benchmarks/bench_train.py                                  # CPU: SmolLM2, fp32
    python benchmarks/bench_train.py --models llama3-8b:4 llama3.2-1b --dtype bf16 --batch 4 --seq 2048

``--setups`` compares the step's options instead (packing, chunked CE, compiled layers; each with
ProCon off and on; see train_setups.py), into setups_<device tag>.csv and .png:

    python benchmarks/bench_train.py --setups padded packed --models smollm2 \
        --data ../shared/data/gsm8k/train.jsonl --rows 256 --max-length 512 --batch 8 --micro-batch 4
    python benchmarks/bench_train.py --setups padded chunked --models llama3-128k-small --batch 4 --seq 512

``--host CONFIG``: the training thread's host time per step outside forward + backward of
``fastprocon train`` on a config, batches made on it or by the prefetch thread (host_time.py):

    python benchmarks/bench_train.py --host default --pairs 10 --host-steps 6

``--setups ... --pairs N``: the ProCon overhead per set-up from N interleaved (off, fused) pairs on
one batch, with its spread, and the compile time of compiled set-ups (no memory pass; see
train_setups.py):

    python benchmarks/bench_train.py --setups padded packed chunked compiled --models smollm2 \
        --data ../shared/data/gsm8k/train.jsonl --rows 256 --batch 2 --micro-batch 2 --pairs 20 --warmup 2
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import harness
import host_time
import torch
import train_setups
from tqdm.auto import tqdm

from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.models.layers import decoder_layers, hidden_size
from fastprocon.models.load import load_model
from fastprocon.procon.hooks import ProConHooks
from fastprocon.train.loss import shift_labels
from fastprocon.train.metrics import attention_width, count_params, matmul_params, peak_flops, training_flops
from fastprocon.train.step import make_optimizer, micro_step, optimizer_update

VARIANTS = ("off", "reference", "fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FIELDS = harness.ENV_FIELDS + (
    "model", "params", "layers", "hidden", "batch", "seq", "dtype", "variant", "backend", "rounds",
    "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "mfu", "peak_mem_bytes", "step_overhead", "mem_overhead")
PROMPT_FRACTION = 0.3

# Real configurations (Hugging Face config.json values that set the compute and memory).
ARCHS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                        max_position_embeddings=131072, rms_norm_eps=1e-5),
    # Llama-3's vocabulary and layout at a small width and depth: what the output layer costs
    "llama3-128k-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=128256, tie_word_embeddings=False,
                              rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5),
}
LOADED = ("smollm2", "tiny")


def build_model(spec: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, str]:
    """(model in train mode on device, its name) for ``name`` or ``name:layers``."""
    name, _, layers = spec.partition(":")
    if layers and not (layers.isdigit() and int(layers) > 0):
        raise ValueError(f"model spec {spec!r}: what follows ':' must be a layer count >= 1")
    if name in LOADED:
        model = load_model(name, dtype=dtype, device=device).model
    elif name in ARCHS:
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(**ARCHS[name])
        config._attn_implementation = "sdpa"
        if layers:
            config.num_hidden_layers = int(layers)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)            # initialise directly in the training dtype
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    else:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(ARCHS) + list(LOADED)}")
    if layers and name in LOADED:
        layer_list = decoder_layers(model)
        del layer_list[int(layers):]
        model.config.num_hidden_layers = len(layer_list)
    return model.train(), spec


def make_batch(batch: int, seq: int, vocab: int, n_layers: int, hidden: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[:, :max(1, int(PROMPT_FRACTION * seq))] = IGNORE_INDEX
    directions = torch.randn(n_layers, hidden, generator=g)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            # targets: CPU, as the trainer's
            "targets": shift_labels(labels), "weight": (labels != IGNORE_INDEX).to(device),
            "z0": torch.randn(n_layers, batch, seq, generator=g).to(device),
            "directions": (directions / directions.norm(dim=1, keepdim=True)).to(device),
            "scale": torch.tensor(1.0 / batch, device=device),      # alpha = 1, "sample" reduction
            "n_pred": int((labels[:, 1:] != IGNORE_INDEX).sum())}


def train_step(model, optimizer, params, batch: dict, hooks: ProConHooks | None) -> None:
    """One optimizer step through the trainer's own micro-step and update (fastprocon/train/step.py):
    single process, one micro-batch, gradient clipping at 1.0."""
    device = batch["input_ids"].device
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    procon = {} if hooks is None else dict(hooks=hooks, weight=batch["weight"], z0=batch["z0"], scale=batch["scale"])
    micro_step(model, inputs, batch["targets"], 1.0 / batch["n_pred"], device, **procon)
    if hooks is not None:
        hooks.take_penalty()
    optimizer_update(params, optimizer, max_norm=1.0)


@harness.releases_memory
def bench_model(spec: str, args, device: torch.device, env: dict, memory_pass: bool = False) -> list[dict]:
    """Rows for one model, one per variant. ``memory_pass`` (CPU, in its own process, see main):
    one warm-up and one measured step per variant, rows {"key", "peak_mem_bytes"} only."""
    warmup, rounds = (1, 1) if memory_pass else (args.warmup, args.rounds)
    dtype = DTYPES[args.dtype]
    model, name = build_model(spec, dtype, device)
    layers = decoder_layers(model)
    n_layers, hidden = len(layers), hidden_size(model)
    batch = make_batch(args.batch, args.seq, model.config.vocab_size, n_layers, hidden, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, device, lr=1e-5)   # the trainer's AdamW (fused where torch has it)
    fused_backend = "triton" if device.type == "cuda" else "torch"
    all_layers = list(range(n_layers))
    hooks = {"off": None,
             "reference": ProConHooks(model, all_layers, batch["directions"], backend="reference"),
             "fused": ProConHooks(model, all_layers, batch["directions"], backend=fused_backend)}
    times = {v: [] for v in args.variants}
    peaks = {v: 0 for v in args.variants}

    def run(variant: str) -> tuple[float, int]:
        h = hooks[variant]
        with h.installed() if h is not None else contextlib.nullcontext():
            harness.synchronize(device)
            harness.reset_peak(device)
            start = time.perf_counter()
            train_step(model, optimizer, params, batch, h)
            harness.synchronize(device)
            return (time.perf_counter() - start) * 1e3, harness.peak_bytes(device)

    total = len(args.variants) * (warmup + rounds)
    desc = f"bench_train {name}" + (" memory pass" if memory_pass else "")
    with tqdm(total=total, desc=desc, unit="step", file=sys.stderr) as bar:
        for _ in range(warmup):
            for v in args.variants:
                run(v)
                bar.update(1)
        for _ in range(rounds):
            for v in args.variants:
                ms, peak = run(v)
                times[v].append(ms)
                peaks[v] = max(peaks[v], peak)
                bar.update(1)

    if memory_pass:
        return [{"key": f"{name}|{v}", "peak_mem_bytes": peaks[v]} for v in args.variants]
    tokens = args.batch * args.seq
    n_matmul = matmul_params(model)
    flops = training_flops(n_matmul, n_layers, attention_width(model.config), [args.seq]) / args.seq
    peak = peak_flops(device)
    rows = []
    for v in args.variants:
        t = harness.quantiles(times[v])
        tokens_per_s = tokens / (t.median_ms / 1e3)
        ratios = [a / b for a, b in zip(times[v], times["off"])] if "off" in times else []
        rows.append({**env, "model": name, "params": count_params(model), "layers": n_layers, "hidden": hidden,
                     "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "variant": v,
                     "backend": {"off": "", "reference": "reference", "fused": fused_backend}[v],
                     "rounds": args.rounds, "median_ms": f"{t.median_ms:.2f}", "p20_ms": f"{t.p20_ms:.2f}",
                     "p80_ms": f"{t.p80_ms:.2f}", "tokens_per_s": f"{tokens_per_s:.1f}",
                     "mfu": f"{tokens_per_s * flops / peak:.4f}" if peak else "",
                     "peak_mem_bytes": "", "mem_overhead": "",
                     "step_overhead": f"{statistics.median(ratios) - 1:.4f}" if ratios else ""})
    if device.type == "cuda":
        fill_memory(rows, peaks)
    return rows


def fill_memory(rows: list[dict], peaks: dict) -> None:
    """Set one model's rows' peak memory and its overhead over ProCon off, from {variant: bytes}."""
    for r in rows:
        r["peak_mem_bytes"] = peaks[r["variant"]]
        r["mem_overhead"] = f"{peaks[r['variant']] / peaks['off'] - 1:.4f}" if "off" in peaks else ""


def summary(rows: list[dict]) -> str:
    lines = [f"{'model':<16} {'variant':<10} {'step ms':>9} {'p20-p80':>17} {'tok/s':>9} {'MFU':>6} "
             f"{'peak mem':>10} {'+time':>7} {'+mem':>7}"]
    for r in rows:
        pct = lambda key: f"{100 * float(r[key]):+.1f}%" if r[key] != "" else "-"          # noqa: E731
        mfu = f"{100 * float(r['mfu']):.1f}%" if r["mfu"] != "" else "-"
        lines.append(f"{r['model']:<16} {r['variant']:<10} {float(r['median_ms']):>9.1f} "
                     f"{float(r['p20_ms']):>8.1f}-{float(r['p80_ms']):<8.1f} {float(r['tokens_per_s']):>9.0f} "
                     f"{mfu:>6} {harness.fmt_bytes(int(r['peak_mem_bytes'])):>10} {pct('step_overhead'):>7} "
                     f"{pct('mem_overhead'):>7}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--models", nargs="+", help="model specs (default: smollm2 on CPU; llama3-8b:4 and "
                                               "llama3.2-1b on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="parameter/activation dtype (default fp32 on CPU, "
                                                            "bf16 on CUDA)")
    p.add_argument("--batch", type=int, help="sequences per step (default 4 on CPU and CUDA)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 128 on CPU, 2048 on CUDA)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    p.add_argument("--rounds", type=int, help="timed steps per variant, interleaved (default 8 CPU, 10 CUDA)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--setups", nargs="+", choices=sorted(train_setups.SETUPS),
                   help="compare these step set-ups (each with ProCon off and fused) instead of the ProCon variants")
    p.add_argument("--data", type=Path, help="--setups: a data file (json/jsonl) instead of random tokens")
    p.add_argument("--rows", type=int, default=256, help="--setups --data: rows used (default 256)")
    p.add_argument("--max-length", type=int, default=512, help="--setups --data: tokens per sample (default 512)")
    p.add_argument("--micro-batch", type=int, default=4, help="--setups: samples per padded micro-batch (default 4; "
                                                               "packed rows hold max-length tokens)")
    p.add_argument("--seq-min", type=int, help="--setups without --data: sample lengths uniform in "
                                                "[seq-min, seq] (default: all --seq)")
    p.add_argument("--steps", type=int, default=3, help="--setups: timed steps per set-up and variant (default 3)")
    p.add_argument("--pairs", type=int, help="--setups: N interleaved (off, fused) pairs per set-up on one batch "
                                              "(step 0) instead of --steps, for the ProCon overhead and its spread; "
                                              "--warmup untimed steps first; no memory pass")
    p.add_argument("--time-limit", type=float, help="--pairs: stop the pairs after this many seconds (whole rounds)")
    host_time.add_arguments(p)
    p.add_argument("--memory-pass", type=Path, help=argparse.SUPPRESS)   # internal: CPU memory pass output
    p.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/train_<device tag>.csv)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    cuda = harness.resolve_device(args.device).type == "cuda"
    defaults = dict(models=["llama3-8b:4", "llama3.2-1b"] if cuda else ["smollm2"], dtype="bf16" if cuda else "fp32",
                    batch=4, seq=2048 if cuda else 128, rounds=10 if cuda else 8)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.host:
        args.pairs = 5 if args.pairs is None else args.pairs
        if args.pairs < 1 or args.host_steps < 2 or args.prefetch_depth < 1:
            raise SystemExit("--host needs --pairs >= 1, --host-steps >= 2 and --prefetch-depth >= 1")
    elif args.pairs is not None and (args.pairs < 1 or not args.setups):
        raise SystemExit("--pairs needs --setups (or --host) and must be >= 1")
    for name in ("batch", "seq", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = harness.start(args)
    if args.host:
        return host_time.bench(args, argv, device)
    if args.setups:
        return main_setups(args, argv, device)
    if args.memory_pass is not None:
        return harness.memory_pass(args.memory_pass, lambda: [
            row for spec in args.models for row in bench_model(spec, args, device, {}, memory_pass=True)])
    env = harness.environment(device, "benchmarks/bench_train.py", argv)
    rows = []
    for spec in args.models:
        rows += bench_model(spec, args, device, env)
    if device.type == "cpu":
        peaks = {r["key"]: r["peak_mem_bytes"] for r in harness.memory_pass_subprocess(Path(__file__), argv)}
        for model in dict.fromkeys(r["model"] for r in rows):
            fill_memory([r for r in rows if r["model"] == model],
                        {v: peaks[f"{model}|{v}"] for v in args.variants})
    out = args.out or harness.RESULTS_DIR / f"train_{harness.device_tag(device)}.csv"
    harness.save_rows(out, rows, FIELDS, summary(rows))
    return 0


def main_setups(args, argv: list, device: torch.device) -> int:
    """--setups: rows per (model, set-up, variant) into setups_<tag>.csv and a PNG beside it."""
    if args.memory_pass is not None:
        return harness.memory_pass(args.memory_pass, lambda: [
            row for spec in args.models
            for row in train_setups.bench(spec, args, device, {}, build_model, memory_pass=True)])
    env = harness.environment(device, "benchmarks/bench_train.py", argv)
    rows = []
    for spec in args.models:
        rows += train_setups.bench(spec, args, device, env, build_model)
    if device.type == "cpu" and not args.pairs:
        peaks = {r["key"]: r["peak_mem_bytes"] for r in harness.memory_pass_subprocess(Path(__file__), argv)}
        for r in rows:
            r["peak_mem_bytes"] = peaks[f"{r['model']}|{r['setup']}|{r['variant']}"]
    out = args.out or harness.RESULTS_DIR / f"setups_{harness.device_tag(device)}.csv"
    harness.save_rows(out, rows, train_setups.FIELDS, train_setups.summary(rows))
    train_setups.plot(rows, Path(out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
