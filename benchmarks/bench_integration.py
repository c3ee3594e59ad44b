"""Overhead of fastprocon.integrations over a plain TRL SFTTrainer run (CPU, a few steps).

Each round builds a fresh model and SFTTrainer per variant, "plain" and "procon" (add_procon
with ProCon_s, alpha 0.1, at every layer with a direction), in alternating order, so machine
load drifts hit both alike; reports the median over rounds of the time per optimizer step
(steps after the first) and, for "procon", the set-up time of add_procon (the z0 pre-pass
over the training data; directions are made once beforehand and loaded). The load average is
recorded in each row: this machine is shared.

    python benchmarks/bench_integration.py --model smollm2 --rounds 2 --steps 3 --batch 2 --rows 16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

FIELDS = (*harness.ENV_FIELDS, "model", "variant", "round", "rows", "steps", "batch", "step_s", "setup_s",
          "load_avg_1m")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rows", type=int, default=0,
                   help="use the first ROWS rows of the built-in benign set (0 = all 48)")
    p.add_argument("--out", default=str(harness.RESULTS_DIR / "integration_cpu.csv"))
    return p.parse_args(argv)


def one_run(args, variant: str, directions: Path, rows: list, round_: int, env: dict) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from fastprocon.data.examples import load_examples, resolve_data_path
    from fastprocon.integrations import add_procon
    from fastprocon.models.load import load_model

    loaded = load_model(args.model)
    rows_ = [{"prompt": [{"role": "user", "content": ex.prompt}],
              "completion": [{"role": "assistant", "content": ex.response}]}
             for ex in load_examples(resolve_data_path("benign"))[:args.rows or None]]
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                           learning_rate=2e-5, max_length=128, logging_steps=args.steps, save_strategy="no",
                           report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
        trainer = SFTTrainer(model=loaded.model, args=config, train_dataset=Dataset.from_list(rows_),
                             processing_class=loaded.tokenizer, callbacks=[Clock()])
        setup = None
        if variant == "procon":
            t0 = time.perf_counter()
            add_procon(trainer, alpha=0.1, directions=str(directions))
            setup = time.perf_counter() - t0
        trainer.train()
    step_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    rows.append({**env, "model": args.model, "variant": variant, "round": round_, "rows": len(rows_),
                 "steps": args.steps, "batch": args.batch, "step_s": round(step_s, 3),
                 "setup_s": None if setup is None else round(setup, 2), "load_avg_1m": os.getloadavg()[0]})
    print(rows[-1]["variant"], rows[-1]["round"], rows[-1]["step_s"], rows[-1]["setup_s"], rows[-1]["load_avg_1m"],
          flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from fastprocon.integrations import ProCon
    from fastprocon.models.load import load_model

    env = harness.environment(torch.device("cpu"), "benchmarks/bench_integration.py",
                              sys.argv[1:] if argv is None else argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        directions = Path(tmp) / "directions.safetensors"
        loaded = load_model(args.model)
        t0 = time.perf_counter()
        ProCon(loaded.model, loaded.tokenizer, directions=str(directions)).remove()
        print(f"directions made in {time.perf_counter() - t0:.1f} s (once; loaded by every procon run)")
        del loaded
        for r in range(args.rounds):
            for variant in (("plain", "procon") if r % 2 == 0 else ("procon", "plain")):
                one_run(args, variant, directions, rows, r, env)
    med = {v: statistics.median(float(x["step_s"]) for x in rows if x["variant"] == v) for v in ("plain", "procon")}
    setup = statistics.median(float(x["setup_s"]) for x in rows if x["variant"] == "procon")
    summary = (f"{args.model}, batch {args.batch}, {args.steps} steps x {args.rounds} rounds: plain SFTTrainer "
               f"{med['plain']:.2f} s/step, with add_procon {med['procon']:.2f} s/step "
               f"({100 * (med['procon'] / med['plain'] - 1):+.1f}%); add_procon set-up (z0 pre-pass) {setup:.1f} s; "
               f"load average {min(float(x['load_avg_1m']) for x in rows):.1f}-"
               f"{max(float(x['load_avg_1m']) for x in rows):.1f}")
    harness.save_rows(Path(args.out), rows, FIELDS, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
