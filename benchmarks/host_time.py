"""``bench_train.py --host CONFIG``: the training thread's host time per optimizer step outside
forward + backward, with the batches made on it ("sync", train.prefetch = 0) or by the prefetch
thread ("prefetch", train.prefetch = depth).

The trainer is the real one (``fastprocon.train.Trainer`` on the config, with its data, reference
cache and ProCon hooks; made once, its directions and z0 cache kept in --run-dir). Rounds of two
blocks of --host-steps optimizer steps (steps 0, 1, ... of the plan in each block: the same
batches), the order of the two blocks flipped every round, so slow drifts of a shared machine hit
both alike; the first step of each block (the prefetch thread's cold start) is not counted.

Per step, on the training thread (``time.perf_counter``):
  step_ms       Trainer.step, up to the end of its GPU work (a CUDA sync after the step)
  fwd_bwd_ms    inside the micro-steps (train/step.py's micro_step: forward and backward)
  optimizer_ms  inside optimizer_update (clip, AdamW, schedule)
  host_ms       the rest before the sync: batch preparation (sync mode), waiting for the prefetch
                thread, copies to the device, the step's bookkeeping
``prepare_ms`` is Trainer.prepare_step alone (the host work the prefetch thread takes off), timed
on its own; ``host_saved_ms`` is the median over rounds of (sync host_ms - prefetch host_ms).
On CUDA the micro-steps return when their kernels are queued: fwd_bwd_ms is then launch time, and
the GPU work shows in step_ms.

    python benchmarks/bench_train.py --host tiny --pairs 3 --host-steps 3 --set max_steps=8
    python benchmarks/bench_train.py --host default --pairs 10 --host-steps 6
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import harness
import torch
from tqdm.auto import tqdm

import fastprocon.distributed as D
import fastprocon.train.trainer as trainer_module
from fastprocon.train import Trainer, load_config
from fastprocon.train.prefetch import Prefetcher

MODES = ("sync", "prefetch")
FIELDS = harness.ENV_FIELDS + (
    "config", "model", "procon", "mode", "prefetch_depth", "rounds", "steps", "step_ms", "step_p20_ms", "step_p80_ms",
    "fwd_bwd_ms", "optimizer_ms", "host_ms", "host_p20_ms", "host_p80_ms", "prepare_ms", "host_saved_ms",
    "real_tokens_per_s", "load_avg")


class Timed:
    """Wraps a function of the trainer module; adds the seconds spent in it to ``seconds``."""

    def __init__(self, name: str):
        self.name, self.original, self.seconds = name, getattr(trainer_module, name), 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def run_block(trainer: Trainer, mode: str, steps: list[int], depth: int, timers: dict, device,
              tokens: dict) -> list[dict]:
    """Time ``steps`` on ``trainer`` (the block's first step left out); ``tokens``: real tokens by step."""
    prefetch = Prefetcher(trainer.prepare_step, steps, depth=depth) if mode == "prefetch" else \
        contextlib.nullcontext()
    out = []
    with prefetch as trainer._prefetch:
        for i, s in enumerate(steps):
            for t in timers.values():
                t.seconds = 0.0
            harness.synchronize(device)
            start = time.perf_counter()
            trainer.step(s)
            queued = time.perf_counter()
            harness.synchronize(device)
            end = time.perf_counter()
            if i == 0:
                continue
            inside = timers["micro_step"].seconds + timers["optimizer_update"].seconds
            out.append({"step_ms": (end - start) * 1e3, "fwd_bwd_ms": timers["micro_step"].seconds * 1e3,
                        "optimizer_ms": timers["optimizer_update"].seconds * 1e3,
                        "host_ms": (queued - start - inside) * 1e3, "tokens": tokens[s]})
    trainer._prefetch = None
    return out


def bench(args, argv: list, device: torch.device) -> int:
    overrides = [f"run_dir={args.run_dir}", "resume=never", "export=false", "log_every=1000000",
                 f"model.device={device.type}", *args.set]
    cfg = load_config(args.host, overrides)
    ctx = D.init_distributed(device.type)
    timers = {name: Timed(name) for name in ("micro_step", "optimizer_update")}
    try:
        trainer = Trainer(cfg, ctx)
        for name, timer in timers.items():
            setattr(trainer_module, name, timer)
        steps = list(range(min(args.host_steps, trainer.max_steps)))
        if len(steps) < 2:
            raise SystemExit("--host-steps (and the config's max_steps) must allow at least 2 steps")
        # before any prefetch thread runs: the batch plan is the worker's alone while it does
        tokens = {s: int(trainer._n_tok[trainer.batches.global_indices(s)].sum()) for s in steps}
        results = {m: [] for m in MODES}
        prepare = []
        hooks = trainer.hooks.installed() if trainer.hooks is not None else contextlib.nullcontext()
        with hooks, tqdm(total=args.pairs * 2, desc="host time", unit="block", file=sys.stderr) as bar:
            for r in range(args.pairs):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    results[mode].append(run_block(trainer, mode, steps, args.prefetch_depth, timers, device,
                                                        tokens))
                    bar.update(1)
                for s in steps[1:]:
                    start = time.perf_counter()
                    trainer.prepare_step(s)
                    prepare.append((time.perf_counter() - start) * 1e3)
        model_name, procon = trainer.model_name, trainer.hooks is not None
        del trainer
    finally:
        for name, timer in timers.items():
            setattr(trainer_module, name, timer.original)
        D.shutdown(ctx)
    env = harness.environment(device, "benchmarks/bench_train.py", argv)
    rounds_host = {m: [statistics.median(x["host_ms"] for x in block) for block in results[m]] for m in MODES}
    saved = statistics.median(a - b for a, b in zip(rounds_host["sync"], rounds_host["prefetch"]))
    rows = []
    for mode in MODES:
        flat = [x for block in results[mode] for x in block]
        step, host = harness.quantiles([x["step_ms"] for x in flat]), harness.quantiles([x["host_ms"] for x in flat])
        n_tokens = sum(x["tokens"] for x in flat)
        rows.append({**env, "config": args.host, "model": model_name, "procon": procon, "mode": mode,
                     "prefetch_depth": args.prefetch_depth if mode == "prefetch" else 0, "rounds": args.pairs,
                     "steps": len(flat), "step_ms": f"{step.median_ms:.2f}", "step_p20_ms": f"{step.p20_ms:.2f}",
                     "step_p80_ms": f"{step.p80_ms:.2f}",
                     "fwd_bwd_ms": f"{statistics.median(x['fwd_bwd_ms'] for x in flat):.2f}",
                     "optimizer_ms": f"{statistics.median(x['optimizer_ms'] for x in flat):.2f}",
                     "host_ms": f"{host.median_ms:.2f}", "host_p20_ms": f"{host.p20_ms:.2f}",
                     "host_p80_ms": f"{host.p80_ms:.2f}", "prepare_ms": f"{statistics.median(prepare):.2f}",
                     "host_saved_ms": f"{saved:.2f}" if mode == "prefetch" else "",
                     "real_tokens_per_s": f"{n_tokens / (sum(x['step_ms'] for x in flat) / 1e3):.1f}",
                     "load_avg": f"{os.getloadavg()[0]:.2f}"})
    out = args.out or harness.RESULTS_DIR / f"host_{harness.device_tag(device)}.csv"
    harness.save_rows(out, rows, FIELDS, summary(rows))
    return 0


def summary(rows: list[dict]) -> str:
    lines = [f"{'mode':<9} {'step ms':>9} {'fwd+bwd':>9} {'optim':>7} {'host ms':>9} {'p20-p80':>15} "
             f"{'prepare':>8} {'saved':>7} {'real tok/s':>11}"]
    for r in rows:
        lines.append(f"{r['mode']:<9} {float(r['step_ms']):>9.1f} {float(r['fwd_bwd_ms']):>9.1f} "
                     f"{float(r['optimizer_ms']):>7.1f} {float(r['host_ms']):>9.2f} "
                     f"{float(r['host_p20_ms']):>7.2f}-{float(r['host_p80_ms']):<7.2f} {float(r['prepare_ms']):>8.2f} "
                     f"{r['host_saved_ms'] or '-':>7} {float(r['real_tokens_per_s']):>11.0f}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--host", metavar="CONFIG", help="measure the host time per step of `fastprocon train` on this "
                                                     "config (tiny, default or a .toml), prefetch off and on; "
                                                     "--pairs rounds (default 5)")
    p.add_argument("--host-steps", type=int, default=4, help="--host: steps per block, the first not counted "
                                                             "(default 4)")
    p.add_argument("--prefetch-depth", type=int, default=2, help="--host: train.prefetch of the prefetch blocks")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="--host: config overrides")
    p.add_argument("--run-dir", type=Path, default=Path("runs/bench_host"),
                   help="--host: the trainer's run directory (its directions and z0 cache are made there once)")
