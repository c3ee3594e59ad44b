"""Cost of the live safety probe (fastprocon/train/probe.py) against training steps, interleaved.

Builds the trainer of a config (default: the README's demo, `fastprocon/configs/default.toml`),
then alternates one optimizer step and one probe, timing each, so both see the same machine
load; prints the ratio probe / step and what it means at the config's safety_probe_every, and
writes a CSV (one row per timed call, with the load average). The run directory should already
hold directions.safetensors and reference.safetensors (else they are made first, untimed).

    python benchmarks/bench_probe.py --run-dir /tmp/probe_cost --steps 3
    python benchmarks/bench_probe.py --config tiny --steps 2 --out /tmp/probe_tiny.csv   # smoke
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import harness

import fastprocon.distributed as D
from fastprocon.train import Trainer, load_config

FIELDS = ["config", "what", "step", "seconds", "load_avg_1min", "threads"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default")
    p.add_argument("--run-dir", default="/tmp/fastprocon_probe_cost")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR / "probe_cost.csv")
    args = p.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    for stale in ("metrics.jsonl", "checkpoints", "probe_directions.safetensors", "probe_z0.safetensors"):
        path = run_dir / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    cfg = load_config(args.config, [f"run_dir={run_dir}", "resume=never", "export=false"])
    if not cfg.train.safety_probe_every:
        cfg.train.safety_probe_every = 16
    ctx = D.init_distributed("cpu")
    rows = []

    def timed(what: str, step: int, fn) -> float:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        import torch
        rows.append({"config": args.config, "what": what, "step": step, "seconds": round(seconds, 3),
                     "load_avg_1min": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads()})
        print(rows[-1], flush=True)
        return seconds

    try:
        trainer = Trainer(cfg, ctx)
        timed("probe (step 0: makes the step-0 state)", 0, lambda: trainer.probe.measure(0))
        steps, probes = [], []
        with trainer.hooks.installed() if trainer.hooks is not None else contextlib_null():
            for s in range(args.steps):
                steps.append(timed("train step", s + 1, lambda: trainer.step(s)))
                probes.append(timed("probe", s + 1, lambda: trainer.probe.measure(s + 1)))
        trainer = None                  # frees it before the process group shuts down, as before
    finally:
        D.shutdown(ctx)
    ratio = sum(probes) / sum(steps)
    every = cfg.train.safety_probe_every
    max_steps = cfg.train.max_steps or 32
    n_probes = len({0, max_steps, *range(0, max_steps + 1, every)})
    summary = (f"probe / step = {ratio:.3f}; at safety_probe_every = {every} ({n_probes} probes in {max_steps} "
               f"steps) the probes cost {100 * ratio * n_probes / max_steps:.1f}% of the steps' time")
    harness.save_rows(args.out, rows, FIELDS, summary)


def contextlib_null():
    import contextlib
    return contextlib.nullcontext()


if __name__ == "__main__":
    main()
