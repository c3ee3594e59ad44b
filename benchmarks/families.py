"""The family support table and a step-time sanity check, on the tiny random models of
tests/models/families.py (two layers, hidden 64; seconds each on a CPU).

For each family: how `fastprocon train` loads it (sharded: as stored, with keys renamed or experts
fused by transformers' own conversion rules; or whole through from_pretrained), whether packing
and the chunked CE are exact on it (the trainer's own checks), LoRA's targets and trained
parameters, and the median step time of
`fastprocon train` (ProCon off, padded, batch 4, one process) against the same steps through
`transformers.Trainer` on the same model and samples.

    python benchmarks/families.py --out benchmarks/results/families_cpu.csv --table docs/families.md
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))
from families import FAMILIES, save_family  # noqa: E402

import fastprocon.distributed as D  # noqa: E402
from fastprocon.models import load_model  # noqa: E402
from fastprocon.models.conversion import conversion_rules, plan_conversion  # noqa: E402
from fastprocon.models.layers import attention_projections  # noqa: E402
from fastprocon.models.load import default_attn_implementation, model_class  # noqa: E402
from fastprocon.models.loading import NotShardable, build_model, stored_tensors, weight_files  # noqa: E402
from fastprocon.train import Trainer, load_config  # noqa: E402
from fastprocon.train.chunked_ce import check_chunked_ce_exact  # noqa: E402
from fastprocon.train.packing import check_packing_exact  # noqa: E402
from fastprocon.train.prepare import apply_lora  # noqa: E402

FIELDS = ["family", "sharded_load", "packing", "chunked_ce", "lora_targets", "lora_params", "params",
          "fastprocon_step_ms", "hf_trainer_step_ms", "steps", "load_average"]


def sharded_load(directory: Path) -> str:
    """How the sharded loader reads this checkpoint: as it is, with keys renamed, or with tensors
    fused by transformers' conversion rules; or not at all (whole model per process)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device("cpu")
    attn = default_attn_implementation(device, model_class(directory))
    try:
        build_model(directory, dtype=torch.float32, device=device, attn_implementation=attn)
    except NotShardable:
        return "whole model per process"
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), attn_implementation=attn)
    plan = plan_conversion(stored_tensors(directory, weight_files(directory)), meta.state_dict(),
                           conversion_rules(meta), meta.base_model_prefix)
    if plan.converted:
        return "yes (experts fused per shard)" if any(".experts." in k for k in plan.converted) else "yes (fused)"
    return "yes (keys renamed)" if any(name != key for name, key in plan.direct.items()) else "yes"


def support(directory: Path) -> dict:
    sharded = sharded_load(directory)
    model = load_model(str(directory)).model
    cfg = load_config("tiny", [f"spec={directory}", "lora=true"])
    lora = apply_lora(cfg, load_model(str(directory)).model)
    return {"sharded_load": sharded, "packing": "yes" if check_packing_exact(model) is None else "no (exact check)",
            "chunked_ce": "yes" if check_chunked_ce_exact(model) is None else "full logits",
            "lora_targets": " ".join(attention_projections(model)),
            "lora_params": sum(p.numel() for p in lora.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in model.parameters())}


def fastprocon_steps(directory: Path, run_dir: Path, steps: int) -> tuple[list[float], list]:
    """Per-step milliseconds of the trainer (ProCon off, padded) and the micro-batches it ran."""
    cfg = load_config("tiny", [f"spec={directory}", "schedule=off", f"max_steps={steps}", "batch_size=4",
                               "micro_batch_size=4", "packing=off", f"run_dir={run_dir}", "export=false"])
    ctx = D.init_distributed("cpu")
    try:
        trainer = Trainer(cfg, ctx)
        times, batches = [], []
        for step in range(steps):
            batches.append(trainer.batches.micro_batches(step)[0])
            start = time.perf_counter()
            trainer.step(step)
            times.append((time.perf_counter() - start) * 1e3)
        del trainer
    finally:
        D.shutdown(ctx)
    return times, batches


def hf_trainer_steps(directory: Path, batches: list, out: Path) -> list[float]:
    """Per-step milliseconds of transformers.Trainer on the same padded batches (AdamW, clip 1.0)."""
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments
    from transformers import Trainer as HFTrainer

    rows = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}
            for b in batches]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append((time.perf_counter() - self.start) * 1e3)

    clock = Clock()
    args = TrainingArguments(out, per_device_train_batch_size=1, max_steps=len(rows), learning_rate=3e-3,
                             max_grad_norm=1.0, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = HFTrainer(model=AutoModelForCausalLM.from_pretrained(directory), args=args, train_dataset=rows,
                        data_collator=lambda items: {k: v for k, v in items[0].items()}, callbacks=[clock])
    trainer.train()
    return clock.times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="steps per run (the first is not timed)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/families_cpu.csv"))
    p.add_argument("--table", type=Path, help="also write the support table as a Markdown page here")
    args = p.parse_args(argv)
    logging.getLogger("fastprocon").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    import harness

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.families:
            directory = save_family(name, tmp / name)
            row = {"family": name, **support(directory), "steps": args.steps - 1}
            ours, batches = fastprocon_steps(directory, tmp / f"{name}-run", args.steps)
            theirs = hf_trainer_steps(directory, batches, tmp / f"{name}-hf")
            row["fastprocon_step_ms"] = f"{statistics.median(ours[1:]):.1f}"
            row["hf_trainer_step_ms"] = f"{statistics.median(theirs[1:]):.1f}"
            row["load_average"] = f"{os.getloadavg()[0]:.1f}"   # the machine's state: times on a loaded one mislead
            rows.append(row)
            print(row, flush=True)
    harness.write_csv(args.out, rows, FIELDS)
    if args.table:
        load = os.getloadavg()[0]
        lines = ["# Model families", "",
                 "Generated by `python benchmarks/families.py --table docs/families.md` from the tiny random models "
                 "of `tests/models/families.py` (the family matrix the test suite runs: "
                 "`tests/models/test_families.py`). Step times: CPU, one thread, fp32, median of "
                 f"{args.steps - 1} steps of 4 padded samples, ProCon off; load average "
                 f"{load:.1f} at the end (a sanity check of the same model and samples, not a benchmark)."
                 + (f" Measured on a loaded machine (load average {load:.1f} on {os.cpu_count()} cores): the step "
                    "times are only a check that each path runs, not comparable between rows or runs."
                    if load > (os.cpu_count() or 1) / 2 else ""), "",
                 "| family | full fine-tuning | LoRA targets (trained parameters) | packing | chunked CE | load "
                 "| step ms: fastprocon / transformers.Trainer |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['family']} | yes | {r['lora_targets']} ({r['lora_params']:,}) | {r['packing']} | "
                         f"{r['chunked_ce']} | {r['sharded_load']} | {r['fastprocon_step_ms']} / "
                         f"{r['hf_trainer_step_ms']} |")
        lines += ["", "load: every process reads only its shards from the files (docs/scale.md). \"keys renamed\": "
                  "the checkpoint's names differ from the model's (GPT-NeoX's `embed_out` is `lm_head`) and are "
                  "mapped by transformers' own conversion rules; \"experts fused per shard\": the per-expert tensors "
                  "of the files are fused into the model's expert tensors by transformers' own converters, each "
                  "process reading only the experts of its shard; \"whole model per process\": a checkpoint those "
                  "rules cannot map, loaded through `from_pretrained` on each process before sharding (said in one "
                  "warning). \"full logits\": the model's forward post-processes its output layer (logit scaling, "
                  "final-logit softcapping), so the CE comes from its logits.", ""]
        args.table.write_text("\n".join(lines))
        print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
