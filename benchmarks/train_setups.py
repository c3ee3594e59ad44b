"""bench_train.py --setups: the trainer's step under different set-ups, each with ProCon off and on.

A set-up is a combination of the step's options:
  padded     micro-batches padded to their longest sample, full logits, eager layers (the old step)
  packed     whole samples packed into rows (train/packing.py), full logits
  chunked    padded, CE through the chunked output layer (train/chunked_ce.py): no full logits
  compiled   padded, each decoder layer torch.compile'd (fullgraph, inductor)
  all        packed + chunked + compiled (the trainer's CUDA default)
Each runs with ProCon off and with the fused penalty at every layer ("off" / "fused"); everything
is interleaved step by step (set-up x variant), so a shared machine's drift hits all alike.

Samples: with ``--data FILE`` (e.g. GSM8K's train.jsonl), the first ``--rows`` rows tokenized with
the model's chat template and cut at ``--max-length``; otherwise ``--batch`` x ``--steps`` random
samples of ``--seq-min`` to ``--seq`` tokens (30% prompt). Steps follow the trainer's plan (train/batches.py):
``--batch`` samples a step, padded micro-batches of ``--micro-batch`` samples or packed rows of
max-length tokens (the trainer's default on sdpa). z0 and directions are random (the cost does not depend
on them). Reported per (set-up, variant): median step time, real (non-padding) tokens/s, the
padding fraction of the computed tokens (over all steps of the data), MFU on CUDA (real tokens,
attention per sample: train.metrics.training_flops), the peak memory of a step above what was
held before it (parameters and optimizer state; so: activations, logits, gradients and
temporaries; on CPU the resident-set high-water mark, in a separate process, see harness.py),
and the ProCon overhead over the same set-up's ProCon-off step.

``--pairs N`` measures that overhead more tightly: after ``--warmup`` untimed steps per (set-up,
variant), N rounds on one batch (the plan's step 0, the same in every round), each round running
every set-up as a pair, ProCon off and fused back to back on the same model, off first in even
rounds and fused first in odd ones (a fixed order measured a -2% "overhead" for packed with a tight
interval: the step after a change of set-up is slower, which alternation cancels). The overhead is
the median over pairs of (fused / off) - 1, so a shared machine's load, which moves both steps of a
pair alike, cancels; its spread is given as the 20th-80th percentile of the per-pair ratios and a
95% bootstrap interval of the median (columns ``overhead_p20/p80``, ``overhead_ci95_low/high``).
The first warm-up step of each (set-up, variant) is recorded as ``first_step_ms``; for compiled
set-ups ``compile_s`` = first step - median step (torch.compile's time, cold unless inductor's
cache already holds the graphs). The load average (1 min) is sampled every round: ``load_avg`` is
its median. ``--time-limit S`` ends the pairs after the round running when S seconds of
them have passed (the ``pairs`` column says how many ran); so does the signal SIGUSR1.
No memory pass is made with ``--pairs`` (``peak_mem_bytes`` stays empty).
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import statistics
import sys
import time

import harness
import torch
from tqdm.auto import tqdm

from fastprocon.data.examples import IGNORE_INDEX, load_examples
from fastprocon.data.tokenize import TokenizedExample, tokenize_examples
from fastprocon.models.layers import decoder_layers, hidden_size
from fastprocon.procon.hooks import ProConHooks
from fastprocon.train.batches import StepBatches
from fastprocon.train.chunked_ce import OutputLayerLoss
from fastprocon.train.metrics import attention_width, matmul_params, peak_flops, training_flops
from fastprocon.train.packing import forward_kwargs
from fastprocon.train.step import make_optimizer, micro_step, optimizer_update

SETUPS = {"padded": dict(packed=False, chunked=False, compiled=False),
          "packed": dict(packed=True, chunked=False, compiled=False),
          "chunked": dict(packed=False, chunked=True, compiled=False),
          "compiled": dict(packed=False, chunked=False, compiled=True),
          "all": dict(packed=True, chunked=True, compiled=True)}
VARIANTS = ("off", "fused")
FIELDS = harness.ENV_FIELDS + (
    "model", "layers", "hidden", "vocab", "dtype", "data", "samples", "batch", "micro_batch", "max_length", "setup",
    "variant", "steps", "median_ms", "p20_ms", "p80_ms", "real_tokens_per_s", "padding_fraction", "mfu",
    "peak_mem_bytes", "step_overhead", "load_avg",
    # --pairs only (empty otherwise): see the module docstring
    "pairs", "overhead_p20", "overhead_p80", "overhead_ci95_low", "overhead_ci95_high", "first_step_ms", "compile_s")
PROMPT_FRACTION = 0.3


def load_samples(args, tokenizer, vocab: int) -> tuple[list[TokenizedExample], str]:
    if args.data:
        examples = load_examples(args.data)[:args.rows]
        tokenized, _ = tokenize_examples(examples, tokenizer, args.max_length, drop_overlong_prompts=True)
        return tokenized, f"{args.data.name}[:{args.rows}]"
    gen = torch.Generator().manual_seed(0)
    out = []
    low = args.seq_min or args.seq
    for i in range(args.batch * args.steps):
        n = int(torch.randint(low, args.seq + 1, (), generator=gen))
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        cut = max(1, int(PROMPT_FRACTION * n))
        out.append(TokenizedExample(f"random:{i}", ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return out, "random"


def padding_fraction(plan: StepBatches, steps: int) -> float:
    """Padding tokens / computed tokens over ``steps`` steps of ``plan`` (one process)."""
    computed = real = 0
    for s in range(steps):
        for mb in plan.micro_batches(s):
            computed += mb["input_ids"].numel()
            if "attention_mask" in mb:
                real += int(mb["attention_mask"].sum())
            elif mb["ids"]:                       # a packed row (an empty row has no real token)
                real += mb["input_ids"].numel()
    return 1 - real / computed


class Step:
    """One optimizer step of one set-up, as the trainer runs it (one process, no FSDP)."""

    def __init__(self, model, optimizer, params, directions, setup: dict, layers_eager, layers_compiled):
        self.model, self.optimizer, self.params, self.setup = model, optimizer, params, setup
        self.layers = decoder_layers(model)
        self.modules = layers_compiled if setup["compiled"] else layers_eager
        self.output_loss = OutputLayerLoss(model) if setup["chunked"] else None
        self.hooks = ProConHooks(model, list(range(len(self.layers))), directions,
                                 backend="triton" if directions.is_cuda else "torch")

    @contextlib.contextmanager
    def active(self, procon: bool):
        for i, m in enumerate(self.modules):
            self.layers[i] = m
        with (self.output_loss.installed() if self.output_loss else contextlib.nullcontext()), \
                (self.hooks.installed() if procon else contextlib.nullcontext()):
            yield

    def __call__(self, batches: list[dict], n_pred: int, procon: bool, device) -> None:
        """The trainer's micro-steps and update (fastprocon/train/step.py), one process."""
        for mb in batches:
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                      for k, v in forward_kwargs(mb, varlen_kwargs=False).items()}
            armed = dict(hooks=self.hooks, weight=mb["weight"], z0=mb["z0"], scale=mb["scale"]) if procon else {}
            micro_step(self.model, inputs, mb["targets"], 1.0 / n_pred, device, output_loss=self.output_loss, **armed)
        if procon:
            self.hooks.take_penalty()
        optimizer_update(self.params, self.optimizer, max_norm=1.0)


def with_procon_inputs(batches: list[dict], n_layers: int, n_samples: int, device) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    for mb in batches:
        mb["weight"] = (mb["labels"] != IGNORE_INDEX).to(device)
        mb["z0"] = torch.randn(n_layers, *mb["labels"].shape, generator=gen).to(device)
        mb["scale"] = torch.tensor(1.0 / n_samples, device=device)
    return batches


@harness.releases_memory
def bench(spec: str, args, device, env: dict, build_model, memory_pass: bool = False) -> list[dict]:
    from fastprocon.models.load import load_model
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.data and spec not in ("smollm2", "tiny"):
        raise SystemExit("--data needs a model with a tokenizer: --models smollm2 or tiny")
    if args.data:
        loaded = load_model(spec, dtype=dtype, device=device)
        model, name, tokenizer = loaded.model.train(), spec, loaded.tokenizer
    else:
        (model, name), tokenizer = build_model(spec, dtype, device), None
    samples, data_name = load_samples(args, tokenizer, model.config.vocab_size)
    max_length = args.max_length if args.data else args.seq
    n_layers, hidden = len(decoder_layers(model)), hidden_size(model)
    plans = {packed: StepBatches(samples, batch_size=args.batch, micro_batch_size=args.micro_batch, world_size=1,
                                 rank=0, seed=0, pad_id=0,
                                 tokens_per_row=max_length if packed else None)   # the trainer's sdpa default
             for packed in (False, True)}
    total_steps = plans[False].steps_per_epoch
    steps = min(args.steps, total_steps)
    pad_frac = {packed: padding_fraction(plan, total_steps) for packed, plan in plans.items()}
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(n_layers, hidden, generator=g)
    directions = (directions / directions.norm(dim=1, keepdim=True)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, device, lr=1e-5)   # the trainer's AdamW (fused where torch has it)
    layers = decoder_layers(model)
    eager = list(layers)
    compiled = [torch.compile(m, fullgraph=True) for m in eager] if any(SETUPS[s]["compiled"] for s in args.setups) \
        else eager
    runners = {s: Step(model, optimizer, params, directions, SETUPS[s], eager, compiled) for s in args.setups}
    flops_base = (matmul_params(model), n_layers, attention_width(model.config))
    batches = {}
    for packed, plan in plans.items():
        for s in range(steps):
            mbs = with_procon_inputs(plan.micro_batches(s), n_layers, args.batch, device)
            idx = plan.global_indices(s)
            lengths = [len(samples[i].input_ids) for i in idx]
            n_pred = sum(sum(t != IGNORE_INDEX for t in samples[i].labels[1:]) for i in idx)
            batches[packed, s] = (mbs, n_pred, lengths)
    times = {(s, v): [] for s in args.setups for v in VARIANTS}
    peaks = {(s, v): 0 for s in args.setups for v in VARIANTS}
    first = {}
    real = {s: 0 for s in args.setups}
    pairs = getattr(args, "pairs", None) if not memory_pass else None
    warmup = args.warmup if pairs else 1
    # the plan's step of each timed round: --pairs repeats step 0, otherwise steps 0, 1, ...
    timed = [0] * pairs if pairs else [0] if memory_pass else list(range(steps))
    loads = []
    stop = []                       # --pairs: SIGUSR1 ends the pairs after the running round, as --time-limit
    if pairs and hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda *_: stop.append(True))
    order = [(s, v) for s in args.setups for v in VARIANTS]
    flipped = [(s, v) for s in args.setups for v in reversed(VARIANTS)]   # --pairs: fused first in odd rounds
    desc = f"bench_train --setups {name}" + (" memory pass" if memory_pass else "")
    n_runs = (warmup + len(timed)) * len(order)
    deadline = float("inf")         # set when the timed rounds start (i == warmup); only read after that
    with tqdm(total=n_runs, desc=desc, unit="step", file=sys.stderr) as bar:
        for i in range(warmup + len(timed)):
            if pairs and i > warmup and (time.monotonic() > deadline or stop):
                timed = timed[:i - warmup]              # --time-limit: stop after whole rounds
                bar.write(f"--time-limit reached after {len(timed)} pairs")
                break
            if i == warmup:
                deadline = time.monotonic() + (getattr(args, "time_limit", None) or float("inf"))
            step = timed[i - warmup] if i >= warmup else 0
            loads.append(os.getloadavg()[0])
            for s, v in (flipped if pairs and i % 2 == 1 else order):
                mbs, n_pred, lengths = batches[SETUPS[s]["packed"], step]
                runner = runners[s]
                with runner.active(v == "fused"):
                    harness.synchronize(device)
                    before = harness.current_bytes(device)
                    harness.reset_peak(device)
                    t0 = time.perf_counter()
                    runner(mbs, n_pred, v == "fused", device)
                    harness.synchronize(device)
                    ms = (time.perf_counter() - t0) * 1e3
                first.setdefault((s, v), ms)
                if i >= warmup:
                    times[s, v].append(ms)
                    peaks[s, v] = max(peaks[s, v], harness.peak_bytes(device) - before)
                    if v == "off":
                        real[s] += sum(lengths)
                bar.update(1)
    for i, m in enumerate(eager):
        layers[i] = m
    if memory_pass:
        return [{"key": f"{name}|{s}|{v}", "peak_mem_bytes": peaks[s, v]} for s, v in order]
    peak = peak_flops(device)
    load = f"{statistics.median(loads[warmup:] or loads):.1f}"
    rows = []
    for s, v in order:
        t = harness.quantiles(times[s, v])
        seconds = sum(times[s, v]) / 1e3
        tokens_per_s = real[s] / seconds
        flops = sum(training_flops(*flops_base, batches[SETUPS[s]["packed"], k][2]) for k in timed)
        ratios = [a / b for a, b in zip(times[s, v], times[s, "off"])]
        spread = pair_spread(ratios) if pairs else dict.fromkeys(
            ("overhead_p20", "overhead_p80", "overhead_ci95_low", "overhead_ci95_high"), "")
        rows.append({**env, "model": name, "layers": n_layers, "hidden": hidden, "vocab": model.config.vocab_size,
                     "dtype": args.dtype, "data": data_name, "samples": len(samples), "batch": args.batch,
                     "micro_batch": args.micro_batch, "max_length": max_length, "setup": s, "variant": v,
                     "steps": len(timed), "median_ms": f"{t.median_ms:.1f}", "p20_ms": f"{t.p20_ms:.1f}",
                     "p80_ms": f"{t.p80_ms:.1f}", "real_tokens_per_s": f"{tokens_per_s:.1f}",
                     "padding_fraction": f"{pad_frac[SETUPS[s]['packed']]:.4f}",
                     "mfu": f"{flops / seconds / peak:.4f}" if peak else "",
                     "peak_mem_bytes": peaks[s, v] if device.type == "cuda" else "",
                     "step_overhead": f"{statistics.median(ratios) - 1:.4f}", "load_avg": load,
                     "pairs": len(timed) if pairs else "", **spread,
                     "first_step_ms": f"{first[s, v]:.1f}" if pairs else "",
                     "compile_s": f"{(first[s, v] - t.median_ms) / 1e3:.1f}"
                     if pairs and SETUPS[s]["compiled"] else ""})
    return rows


def pair_spread(ratios: list[float], resamples: int = 2000) -> dict:
    """The spread of per-pair overheads (ratio - 1): 20th/80th percentiles and a 95% bootstrap
    interval of their median (seeded, so a CSV's figures can be recomputed)."""
    q = statistics.quantiles(ratios, n=10, method="inclusive") if len(ratios) > 1 else ratios * 9
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {"overhead_p20": f"{q[1] - 1:.4f}", "overhead_p80": f"{q[7] - 1:.4f}",
            "overhead_ci95_low": f"{medians[int(0.025 * resamples)] - 1:.4f}",
            "overhead_ci95_high": f"{medians[int(0.975 * resamples) - 1] - 1:.4f}"}


def summary(rows: list[dict]) -> str:
    lines = [f"{'model':<16} {'setup':<9} {'variant':<7} {'step ms':>9} {'real tok/s':>10} {'padding':>8} "
             f"{'MFU':>6} {'peak mem':>10} {'+ProCon':>8} {'95% CI (pairs)':>17} {'compile':>8}"]
    for r in rows:
        mfu = f"{100 * float(r['mfu']):.1f}%" if r["mfu"] != "" else "-"
        mem = harness.fmt_bytes(int(r["peak_mem_bytes"])) if r["peak_mem_bytes"] != "" else "-"
        lines.append(f"{r['model']:<16} {r['setup']:<9} {r['variant']:<7} {float(r['median_ms']):>9.1f} "
                     f"{float(r['real_tokens_per_s']):>10.1f} {100 * float(r['padding_fraction']):>7.1f}% {mfu:>6} "
                     f"{mem:>10} {100 * float(r['step_overhead']):>+7.1f}% "
                     + (f"{100 * float(r['overhead_ci95_low']):+.2f}..{100 * float(r['overhead_ci95_high']):+.2f}% "
                        if r.get("pairs") and r["variant"] != "off" else f"{'-':>17} ")
                     + (f"{float(r['compile_s']):>7.1f}s" if r.get("compile_s") else f"{'-':>8}"))
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """Real tokens/s and peak memory per set-up (ProCon fused), one group per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fused = [r for r in rows if r["variant"] == "fused"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = [f"{r['model']}\n{r['setup']}" for r in fused]
    axes[0].bar(labels, [float(r["real_tokens_per_s"]) for r in fused])
    axes[0].set_ylabel("real tokens/s (ProCon on)")
    if all(r.get("pairs") for r in fused):       # --pairs: the ProCon overhead and its 95% interval instead
        mid = [100 * float(r["step_overhead"]) for r in fused]
        err = [[m - 100 * float(r["overhead_ci95_low"]) for m, r in zip(mid, fused)],
               [100 * float(r["overhead_ci95_high"]) - m for m, r in zip(mid, fused)]]
        axes[1].bar(labels, mid, yerr=err, capsize=4)
        axes[1].axhline(1, color="grey", linestyle="--", linewidth=0.8)
        axes[1].axhline(-1, color="grey", linestyle="--", linewidth=0.8)
        axes[1].set_ylabel("ProCon at every layer: step time overhead (%)\nmedian of pairs, 95% interval")
    else:
        mem = [int(r["peak_mem_bytes"]) / 2**30 if r["peak_mem_bytes"] != "" else 0 for r in fused]
        axes[1].bar(labels, mem)
        axes[1].set_ylabel("peak memory of a step, above params + optimizer (GiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
