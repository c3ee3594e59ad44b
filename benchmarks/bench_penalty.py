"""Benchmark the ProCon penalty: the fused paths against the unfused reference and torch.compile.

Providers (``--providers``):
  reference            ``fastprocon.penalty.ops.procon_penalty_ref``, eager: the naive version
  compiled             ``torch.compile(procon_penalty_ref)``: the strong baseline a user would pick
  fastprocon           ``procon_penalty`` fused (Triton on CUDA, the chunked torch backend on CPU)
  injection-reference  ``anchor_projection(backend="reference")``: downstream gradient + the
                       reference penalty's gradient, summed by autograd
  injection            ``anchor_projection`` fused: its backward adds the rank-one gradient to
                       the incoming one in one pass (what the trainer runs at every layer)
The injection providers are used as ``out.backward(upstream)``, i.e. under a downstream
``(out * upstream).sum()``.

Modes: forward (with ``hidden.requires_grad``, so whatever backward needs is saved), backward
(of a retained graph), full (both). Per row: median/p20/p80 time, peak extra memory (bytes
above the inputs and the gradient of H that backward must return; see harness.py for how
it is measured per device), achieved bandwidth against the bytes floor, and the fraction of
a device copy's bandwidth (``dst.copy_(H)``, measured on the same inputs in the same run).
Bytes floor: forward reads H once; backward writes dH once (and reads the upstream gradient
once for the injection form); full = forward + backward.

    python benchmarks/bench_penalty.py --preset cpu          # CPU sizes, a few minutes on 2 cores
    python benchmarks/bench_penalty.py --preset gpu          # GPU sizes (see gpu_check.sh)
    python benchmarks/bench_penalty.py --n 8192 --d 2048 --dtypes fp32 --masked yes
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import harness
import torch
from tqdm.auto import tqdm

from fastprocon import anchor_projection, procon_penalty
from fastprocon.penalty.ops import procon_penalty_ref

PROVIDERS = ("reference", "compiled", "fastprocon", "injection-reference", "injection")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FIELDS = harness.ENV_FIELDS + (
    "provider", "backend", "mode", "N", "D", "dtype", "masked", "median_ms", "p20_ms", "p80_ms",
    "extra_mem_bytes", "gbps", "copy_gbps", "frac_of_copy")
SCALE = 0.5

# (N values, D values, extra (N, D) shapes, dtypes, masked settings, warm-up ms, rep ms)
PRESETS = {
    "cpu": ([4096, 16384], [576, 2048], [(8192, 2048)], ["fp32", "bf16"], ["yes", "no"], 100.0, 300.0),
    "gpu": ([4096, 16384, 65536, 262144], [576, 2048, 4096, 8192], [], ["bf16", "fp32"], ["yes", "no"], 5.0, 25.0),
    "smoke": ([64], [48], [], ["fp32"], ["yes"], 0.0, 0.0),
}


class Inputs(NamedTuple):
    hidden: torch.Tensor             # [N, D], requires grad
    direction: torch.Tensor          # [D] fp32, not unit length
    reference: torch.Tensor          # [N] fp32 z0
    weight: Optional[torch.Tensor]   # [N] bool (half True) or None
    upstream: torch.Tensor           # [N, D] incoming gradient for the injection form


def make_inputs(n: int, d: int, dtype: torch.dtype, masked: bool, device: torch.device) -> Inputs:
    g = torch.Generator(device=device).manual_seed(n * 7 + d)
    hidden = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_()
    direction = torch.randn(d, device=device, generator=g)
    reference = torch.randn(n, device=device, generator=g)
    weight = torch.rand(n, device=device, generator=g) < 0.5 if masked else None
    upstream = torch.randn(n, d, device=device, dtype=dtype, generator=g)
    return Inputs(hidden, direction, reference, weight, upstream)


Forward = Callable[[Inputs], tuple]   # -> (tensor to call .backward on, its gradient or None)


def make_forward(provider: str, fused_backend: str, compiled_ref: Callable) -> Forward:
    def reference(x: Inputs):
        return procon_penalty_ref(x.hidden, x.direction, x.reference, x.weight, scale=SCALE)[0], None

    def compiled(x: Inputs):
        return compiled_ref(x.hidden, x.direction, x.reference, x.weight, scale=SCALE)[0], None

    def fused(x: Inputs):
        return procon_penalty(x.hidden, x.direction, x.reference, x.weight, scale=SCALE, backend=fused_backend,
                              validate=False), None

    def injection(backend: str):
        def run(x: Inputs):
            out, _ = anchor_projection(x.hidden, x.direction, x.reference, x.weight, scale=SCALE, backend=backend,
                                       validate=False)
            return out, x.upstream
        return run

    return {"reference": reference, "compiled": compiled, "fastprocon": fused,
            "injection-reference": injection("reference"), "injection": injection(fused_backend)}[provider]


def compile_reference() -> Callable:
    """torch.compile (inductor, default settings) of the reference. Each dtype x mask variant
    compiles once, then once more with dynamic shapes; a silent fall back to eager after too
    many recompiles would mislabel eager numbers as compiled, so that raises instead. Donated
    buffers (backward reusing saved tensors' memory) forbid the retained graph that the backward
    mode times, so they are off; here they would only be the O(N) saved vectors."""
    torch._functorch.config.donated_buffer = False
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True
    return torch.compile(procon_penalty_ref)


def backend_label(provider: str, fused_backend: str) -> str:
    if provider == "compiled":
        return "inductor"
    return fused_backend if provider in ("fastprocon", "injection") else "reference"


def floor_bytes(mode: str, provider: str, hidden_bytes: int) -> int:
    """Minimum bytes moved: forward reads H; backward writes dH (and reads the upstream gradient
    for the injection form); full is both."""
    backward = hidden_bytes * (2 if provider.startswith("injection") else 1)
    return {"forward": hidden_bytes, "backward": backward, "full": hidden_bytes + backward}[mode]


def case_callable(mode: str, forward: Forward, x: Inputs) -> Callable[[], object]:
    """The work of one mode: forward; backward of a retained graph; or both."""
    if mode == "forward":
        return lambda: forward(x)
    if mode == "backward":
        out, grad = forward(x)
        return lambda: out.backward(grad, retain_graph=True)

    def full():
        out, grad = forward(x)
        out.backward(grad)
    return full


def extra_memory(fn: Callable[[], object], x: Inputs, mode: str, device: torch.device) -> int:
    """Peak extra bytes of fn, not counting the gradient of H that backward must return."""
    def clear_grad():
        x.hidden.grad = None

    extra = harness.peak_extra_bytes(fn, device, before=clear_grad)
    clear_grad()
    if mode != "forward":
        # max(0, .): on CPU an output below the mmap threshold may reuse freed heap pages.
        extra = max(0, extra - x.hidden.numel() * x.hidden.element_size())
    return extra


def copy_bandwidth(hidden: torch.Tensor, device: torch.device, args) -> float:
    """GB/s of ``dst.copy_(hidden)`` into a preallocated buffer (read + write of H): the
    device's achievable streaming bandwidth on these very bytes."""
    dst = torch.empty_like(hidden)
    timing = harness.bench_time(lambda: dst.copy_(hidden), device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    return 2 * hidden.numel() * hidden.element_size() / timing.median_ms / 1e6


def case_key(provider, mode, n, d, dtype_name, masked) -> str:
    return f"{provider}|{mode}|{n}|{d}|{dtype_name}|{masked}"


def run(args, device: torch.device, env: dict, memory_pass: bool = False,
        on_progress: Callable[[list], None] = lambda rows: None) -> list[dict]:
    """Timing rows (with in-process memory on CUDA); or, for ``memory_pass``, only
    {"key", "extra_mem_bytes"} rows (the CPU memory pass, see main). ``on_progress(rows)`` runs
    after each shape. Past ``args.time_budget_s`` no new shape is started."""
    start = time.perf_counter()
    fused_backend = "triton" if device.type == "cuda" else "torch"
    compiled_ref = compile_reference()
    grid = [(n, d) for n in args.n for d in args.d]
    shapes = grid + [s for s in args.extra_shapes if s not in grid]
    masked_values = {"yes": [True], "no": [False], "both": [True, False]}[args.masked]
    configs = list(itertools.product(args.dtypes, masked_values, shapes))
    rows = []
    bar = tqdm(total=len(configs) * len(args.providers) * len(args.modes), unit="case", file=sys.stderr,
               desc="bench_penalty memory pass" if memory_pass else "bench_penalty")
    for dtype_name, masked, (n, d) in configs:
        if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
            tqdm.write(f"bench_penalty: time budget of {args.time_budget_s:.0f} s spent, "
                       f"skipping the remaining shapes from {dtype_name} masked={masked} N={n} D={d}", file=sys.stderr)
            break
        x = make_inputs(n, d, DTYPES[dtype_name], masked, device)
        h_bytes = x.hidden.numel() * x.hidden.element_size()
        copy_gbps = None if memory_pass else copy_bandwidth(x.hidden.detach(), device, args)
        for provider, mode in itertools.product(args.providers, args.modes):
            bar.set_postfix_str(f"{dtype_name} N={n} D={d} {provider} {mode}", refresh=False)
            fn = case_callable(mode, make_forward(provider, fused_backend, compiled_ref), x)
            for _ in range(2):        # compilation, first touch: outside what is measured
                x.hidden.grad = None
                fn()
            key = case_key(provider, mode, n, d, dtype_name, masked)
            if memory_pass:
                rows.append({"key": key, "extra_mem_bytes": extra_memory(fn, x, mode, device)})
                bar.update(1)
                continue
            timing = harness.bench_time(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                                        grad_to_none=[x.hidden])
            extra = extra_memory(fn, x, mode, device) if device.type == "cuda" and not args.no_memory else ""
            gbps = floor_bytes(mode, provider, h_bytes) / timing.median_ms / 1e6
            rows.append({**env, "provider": provider, "backend": backend_label(provider, fused_backend),
                         "mode": mode, "N": n, "D": d, "dtype": dtype_name, "masked": masked,
                         "median_ms": f"{timing.median_ms:.4f}", "p20_ms": f"{timing.p20_ms:.4f}",
                         "p80_ms": f"{timing.p80_ms:.4f}", "extra_mem_bytes": extra,
                         "gbps": f"{gbps:.2f}", "copy_gbps": f"{copy_gbps:.2f}",
                         "frac_of_copy": f"{gbps / copy_gbps:.3f}"})
            bar.update(1)
        del x, fn
        if device.type == "cuda":
            torch.cuda.empty_cache()
        on_progress(rows)
    bar.close()
    return rows


def summary(rows: list[dict]) -> str:
    """Full-mode table: each provider's time and extra memory, speedup over the eager reference
    of the same form (penalty or injection)."""
    full = [r for r in rows if r["mode"] == "full"]
    base = {(r["provider"], r["dtype"], r["masked"], r["N"], r["D"]): float(r["median_ms"]) for r in full}
    lines = [f"{'provider':<20} {'dtype':<5} {'mask':<5} {'N':>7} {'D':>5} {'ms':>9} {'x ref':>6} "
             f"{'extra mem':>10} {'GB/s':>7} {'%copy':>6}"]
    for r in full:
        ref = "injection-reference" if r["provider"].startswith("injection") else "reference"
        ref_ms = base.get((ref, r["dtype"], r["masked"], r["N"], r["D"]))
        speed = f"{ref_ms / float(r['median_ms']):.2f}" if ref_ms else "-"
        mem = harness.fmt_bytes(int(r["extra_mem_bytes"])) if r["extra_mem_bytes"] != "" else "-"
        lines.append(f"{r['provider']:<20} {r['dtype']:<5} {str(r['masked']):<5} {r['N']:>7} {r['D']:>5} "
                     f"{float(r['median_ms']):>9.3f} {speed:>6} {mem:>10} {float(r['gbps']):>7.1f} "
                     f"{100 * float(r['frac_of_copy']):>5.0f}%")
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 8192x2048 (N x D), got {text!r}")
    return n, d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="size preset (default: gpu on CUDA, cpu otherwise); the flags below override it")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--n", type=int, nargs="+", help="token counts N")
    p.add_argument("--d", type=int, nargs="+", help="hidden sizes D")
    p.add_argument("--extra-shapes", type=parse_shape, nargs="*", help="more N x D shapes, e.g. 8192x2048")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--masked", choices=["yes", "no", "both"],
                   help="yes: weight masks half the tokens; no: no weight (all tokens)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--warmup-ms", type=float, help="warm-up budget per case (ms)")
    p.add_argument("--rep-ms", type=float, help="timed budget per case (ms; CPU also takes >= 5 repeats)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="start no new shape after this many seconds (0 = no limit); shapes run in the "
                        "order dtype, masked, size")
    p.add_argument("--memory-pass", type=Path, help=argparse.SUPPRESS)   # internal: CPU memory pass output
    p.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/penalty_<device tag>.csv)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    preset = args.preset or ("gpu" if harness.resolve_device(args.device).type == "cuda" else "cpu")
    n, d, extra, dtypes, masked, warmup, rep = PRESETS[preset]
    explicit_grid = args.n is not None or args.d is not None
    args.n = args.n or n
    args.d = args.d or d
    args.extra_shapes = args.extra_shapes if args.extra_shapes is not None else ([] if explicit_grid else extra)
    args.dtypes = args.dtypes or dtypes
    args.masked = args.masked or ("both" if len(masked) == 2 else masked[0])
    bad = [v for v in args.n + args.d + [x for shape in args.extra_shapes for x in shape] if v < 1]
    if bad:
        raise SystemExit(f"bench_penalty: N and D must be >= 1, got {bad}")
    args.warmup_ms = warmup if args.warmup_ms is None else args.warmup_ms
    args.rep_ms = rep if args.rep_ms is None else args.rep_ms
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = harness.start(args)
    if args.memory_pass is not None:
        return harness.memory_pass(args.memory_pass, lambda: run(args, device, {}, memory_pass=True))
    out = args.out or harness.RESULTS_DIR / f"penalty_{harness.device_tag(device)}.csv"
    # The CSV is rewritten after every shape, so a run cut short still leaves its rows.
    rows = run(args, device, harness.environment(device, "benchmarks/bench_penalty.py", argv),
               on_progress=lambda done: harness.write_csv(out, done, FIELDS))
    if device.type == "cpu" and not args.no_memory:
        extra = {r["key"]: r["extra_mem_bytes"] for r in harness.memory_pass_subprocess(Path(__file__), argv)}
        for r in rows:
            r["extra_mem_bytes"] = extra.get(case_key(r["provider"], r["mode"], r["N"], r["D"], r["dtype"],
                                                      r["masked"]), "")
    harness.save_rows(out, rows, FIELDS, summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
