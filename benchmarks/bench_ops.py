"""Count what ProCon adds to one training micro-step, per constrained layer: operators (and on
CUDA, kernel launches), forward and backward, with torch.profiler.

The micro-step is the trainer's (``fastprocon.train.step.micro_step``: arm the hooks, forward,
CE backward, disarm) on one random micro-batch, padded [B, T] or packed into one row. It is
profiled with ProCon off, on at the first k layers and on at all L layers (k = L // 2, at least 1),
each after an unprofiled warm-up step; every count is taken twice and must agree (the counts are
deterministic, so they need no quiet machine). Per constrained layer = (count(L) - count(k)) /
(L - k), exact when each layer adds the same; per micro-batch (arming, the z0 rows) = count(k) -
count(off) - k * per layer.

What is counted (from ``profiler.events()``):
  - ``ops``: top-level operators, i.e. operator events (``aten::``, ``fastprocon::``, ... : a name
    with a namespace other than the profiler's and autograd's own) with no operator above them.
    A custom op counts once: on CPU the "kernels" of the ProCon penalty are the two custom ops of
    the chunked torch path, ``fastprocon::projection_fwd_torch`` and ``projection_bwd_torch``.
  - ``nested_ops``: every operator event, also those inside another one (the torch ops inside the
    custom ops, the kernels' CPU equivalent).
  - ``launches`` (CUDA only): kernel launches and memcpy/memset calls of the CUDA runtime and
    driver APIs (``cudaLaunchKernel``, ``cuLaunchKernel``, ...), each one event on the host.
  - ``procon_kernels``: the ProCon custom ops among the top-level operators (fwd and bwd).
Backward = events under an ``autograd::engine::evaluate_function`` event; forward = the rest.

    python benchmarks/bench_ops.py                       # tiny and SmolLM2-135M, padded and packed
    python benchmarks/bench_ops.py --models tiny --seq 16 --out /tmp/ops.csv
    python benchmarks/bench_ops.py --models tiny smollm2-135m     # on a GPU machine without the weights
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import harness
import torch
from bench_train import build_model
from torch.profiler import ProfilerActivity, profile

from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.data.tokenize import TokenizedExample, collate
from fastprocon.models.layers import decoder_layers, hidden_size
from fastprocon.procon.hooks import ProConHooks
from fastprocon.train.loss import shift_labels
from fastprocon.train.packing import forward_kwargs, pack_collated, pack_like
from fastprocon.train.step import micro_step, to_device

FIELDS = harness.ENV_FIELDS + (
    "model", "layers", "hidden", "dtype", "layout", "tokens", "backend", "phase", "counter", "off", "on_k", "k",
    "on_all", "per_layer", "per_micro_batch", "procon_kernels_per_layer", "beyond_procon_kernels", "added_per_layer")
PHASES = ("forward", "backward")
NOT_OPERATORS = ("autograd", "torch", "profiler", "cuda", "cuda_runtime", "cuda_driver")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync",
            "cudaMemsetAsync", "cudaLaunchCooperativeKernel")
PROCON_KERNELS = ("fastprocon::projection_fwd", "fastprocon::projection_bwd")


def is_operator(name: str) -> bool:
    namespace, sep, _ = name.partition("::")
    return bool(sep) and " " not in namespace and namespace not in NOT_OPERATORS


def phase_of(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        parent = parent.cpu_parent
    return "forward"


def has_operator_above(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if is_operator(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def count_events(events) -> dict:
    """{(phase, counter): Counter of names} for one profiled micro-step."""
    counts = {(p, c): collections.Counter() for p in PHASES for c in ("ops", "nested_ops", "launches")}
    for e in events:
        if e.name in LAUNCHES:
            counts[phase_of(e), "launches"][e.name] += 1
        elif is_operator(e.name):
            counts[phase_of(e), "nested_ops"][e.name] += 1
            if not has_operator_above(e):
                counts[phase_of(e), "ops"][e.name] += 1
    return counts


def micro_batch(layout: str, batch: int, seq: int, vocab: int, n_layers: int, device: torch.device) -> dict:
    """Random samples (lengths from seq // 2 to seq, the first 30% prompt), padded or packed, with
    the hooks' inputs: response mask, z0 [n_layers, B, T] and a scale."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(batch):
        n = seq - (i * seq) // (2 * batch)
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        samples.append(TokenizedExample(f"random:{i}", ids, [IGNORE_INDEX] * max(1, n * 3 // 10) + ids[n * 3 // 10:]))
    mb = collate(samples, 0)
    mb["targets"] = shift_labels(mb["labels"])
    z0 = torch.randn(n_layers, *mb["labels"].shape, generator=gen)
    if layout == "packed":
        mask = mb["attention_mask"].bool()
        mb = pack_collated(mb)
        z0 = pack_like(z0, mask)
    mb["weight"] = to_device(mb["labels"] != IGNORE_INDEX, device)
    mb["z0"] = to_device(z0, device)
    mb["scale"] = torch.full((), 1.0 / batch, device=device)
    return mb


def profile_step(model, mb: dict, device, hooks: ProConHooks | None) -> dict:
    """Counts of one micro-step (after one unprofiled warm-up step), taken twice and checked equal."""
    inputs = {k: to_device(v, device) for k, v in forward_kwargs(mb, varlen_kwargs=False).items()}
    procon = {} if hooks is None else dict(hooks=hooks, weight=mb["weight"], z0=mb["z0"], scale=mb["scale"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    results = []
    with hooks.installed() if hooks is not None else contextlib.nullcontext():
        for repeat in range(3):
            with profile(activities=activities) if repeat else contextlib.nullcontext() as prof:
                micro_step(model, inputs, mb["targets"], 1.0, device, **procon)
                harness.synchronize(device)
            if repeat:
                results.append(count_events(prof.events()))
            model.zero_grad(set_to_none=True)
    if results[0] != results[1]:
        raise RuntimeError("the operator counts of two identical micro-steps differ: not deterministic here")
    return results[0]


def fmt_added(more: collections.Counter, fewer: collections.Counter, per: int) -> str:
    """'name +N; ...' of the names a layer adds (count / per), largest first, then those it removes
    (e.g. an in-place gradient accumulation, add_, that becomes an add)."""
    changes = [(name, n) for name, n in more.items() if n != fewer.get(name, 0)]
    changes += [(name, 0) for name in fewer if name not in more]
    changes = [(name, (n - fewer.get(name, 0)) / per) for name, n in changes]
    return "; ".join(f"{name} {d:+g}" for name, d in sorted(changes, key=lambda c: (-c[1], c[0])))


@harness.releases_memory
def bench_model(spec: str, args, device: torch.device, env: dict) -> list[dict]:
    model, _ = build_model(spec, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], device)
    n_layers, hidden = len(decoder_layers(model)), hidden_size(model)
    k = max(1, n_layers // 2)
    if k == n_layers:
        raise SystemExit(f"{spec} has {n_layers} decoder layer(s): need at least 2 to tell layers apart")
    gen = torch.Generator().manual_seed(1)
    directions = torch.randn(n_layers, hidden, generator=gen).to(device)
    backend = "triton" if device.type == "cuda" else "torch"
    rows = []
    for layout in args.layouts:
        mb = micro_batch(layout, args.batch, args.seq, model.config.vocab_size, n_layers, device)
        counts = {"off": profile_step(model, mb, device, None)}
        for name, layers in (("on_k", list(range(k))), ("on_all", list(range(n_layers)))):
            hooks = ProConHooks(model, layers, directions[layers], backend=backend)
            armed = {**mb, "z0": mb["z0"][layers]}
            counts[name] = profile_step(model, armed, device, hooks)
        for phase in PHASES:
            for counter in ("ops", "nested_ops", "launches"):
                if counter == "launches" and device.type != "cuda":
                    continue
                c = {v: counts[v][phase, counter] for v in counts}
                total = {v: sum(c[v].values()) for v in c}
                per_layer = (total["on_all"] - total["on_k"]) / (n_layers - k)
                procon = sum(n for name, n in (counts["on_all"][phase, "ops"] - counts["on_k"][phase, "ops"]).items()
                             if name.startswith(PROCON_KERNELS)) / (n_layers - k)
                rows.append({**env, "model": spec, "layers": n_layers, "hidden": hidden, "dtype": args.dtype,
                             "layout": layout,
                             "tokens": mb["input_ids"].numel(), "backend": backend, "phase": phase,
                             "counter": counter, "off": total["off"], "on_k": total["on_k"], "k": k,
                             "on_all": total["on_all"], "per_layer": f"{per_layer:g}",
                             "per_micro_batch": f"{total['on_k'] - total['off'] - k * per_layer:g}",
                             "procon_kernels_per_layer": f"{procon:g}" if counter == "ops" else "",
                             "beyond_procon_kernels": f"{per_layer - procon:g}" if counter == "ops" else "",
                             "added_per_layer": fmt_added(c["on_all"], c["on_k"], n_layers - k)})
    return rows


def summary(rows: list[dict]) -> str:
    lines = [f"{'model':<10} {'layout':<7} {'phase':<9} {'counter':<11} {'off':>6} {'all on':>7} {'per layer':>10} "
             f"{'per mb':>7}  added per layer"]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['layout']:<7} {r['phase']:<9} {r['counter']:<11} {r['off']:>6} "
                     f"{r['on_all']:>7} {r['per_layer']:>10} {r['per_micro_batch']:>7}  {r['added_per_layer']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"],
                   help="tiny, smollm2 (the real SmolLM2-135M), or a random-init shape of bench_train.py such as "
                        "smollm2-135m (no weights needed) (default: tiny smollm2)")
    p.add_argument("--layouts", nargs="+", choices=["padded", "packed"], default=["padded", "packed"])
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="parameters and activations (default fp32 on CPU, "
                                                            "bf16 on CUDA, as the trainer computes)")
    p.add_argument("--batch", type=int, default=2, help="samples per micro-batch (default 2)")
    p.add_argument("--seq", type=int, default=64, help="tokens of the longest sample (default 64)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/ops_<device tag>.csv)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.seq < 4:
        raise SystemExit("--batch must be >= 1 and --seq >= 4")
    device = harness.start(args)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    env = harness.environment(device, "benchmarks/bench_ops.py", argv)
    rows = [row for spec in args.models for row in bench_model(spec, args, device, env)]
    out = args.out or harness.RESULTS_DIR / f"ops_{harness.device_tag(device)}.csv"
    harness.save_rows(out, rows, FIELDS, summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
