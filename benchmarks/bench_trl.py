"""``fastprocon train`` against TRL's ``SFTTrainer`` on the same model, data and batch: real
tokens per second (prompt and response tokens, no padding) of the optimizer steps.

Variants (``--variants``):
  fastprocon-off     fastprocon train with schedule = "off" (no ProCon)
  fastprocon-procon  fastprocon train with the config's ProCon at every step (schedule "constant")
  trl-padded         SFTTrainer, packing = False (each micro-batch padded to its longest sample)
  trl-packed         SFTTrainer, packing = True (its best-fit-decreasing packing, padding-free rows)
  trl-*-procon       the same with ProCon added by fastprocon.integrations.add_procon (the config's
                     [procon] at every step; directions from the fastprocon-procon run when it ran
                     first; z0 recorded by its pre-pass over TRL's data loader, not timed)
Same model (the config's model.spec, loaded by fastprocon.models.load_model for TRL too), same
data (the fastprocon trainer's tokenized training set, prompt labels -100, handed to TRL as
``input_ids`` + ``labels``: no re-tokenisation), same batch (TRL's per-device batch =
train.micro_batch_size, gradient accumulation = batch_size / micro_batch_size), same max_length,
lr, warm-up, clipping, AdamW, seed; bf16 autocast over fp32 weights on CUDA for TRL (fastprocon:
FSDP2 bf16 mixed precision). fastprocon's own packing follows its config (data.packing).
TRL's sampler orders the samples its own way; with its packing a micro-batch is
micro_batch_size rows of up to max_length tokens (more samples a step than fastprocon's batch):
real tokens per second compare the throughput, not the optimisation.

Each variant trains --steps optimizer steps from the initial model; the first --warmup steps are
not timed. fastprocon: the seconds of each step from its metrics (log_every = 1: every step has a
metrics line and one host sync; TRL: logging_steps = 1 likewise); its real tokens from the batch plan.
TRL: wall time from a callback's on_step_begin to on_step_end (after a CUDA sync), its real tokens
counted by a forward pre-hook on the model (attention mask sum, or the padding-free row's length).
Rounds (``--rounds``) run every variant once, the order flipped every round; the CSV gives the
median over rounds.

    python benchmarks/bench_trl.py --config default --steps 12 --warmup 2 --rounds 3
    python benchmarks/bench_trl.py --config tiny --steps 3 --warmup 1 --rounds 1 --out /tmp/trl.csv   # smoke

TRL is optional: without it the TRL variants are skipped with a message. trl 1.16.0 installs with
``pip install --no-deps trl==1.16.0`` into this project's environment, whose packages already meet
its requirements (accelerate, datasets, pandas, pyarrow, ...): torch and transformers stay as pinned.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import torch

import fastprocon.distributed as D
from fastprocon.integrations import add_procon
from fastprocon.models.load import load_model
from fastprocon.train import Trainer, load_config

VARIANTS = ("fastprocon-off", "fastprocon-procon", "trl-padded", "trl-packed", "trl-padded-procon",
            "trl-packed-procon")
FIELDS = harness.ENV_FIELDS + (
    "config", "model", "variant", "trl_version", "batch", "micro_batch", "max_length", "rounds", "steps", "warmup",
    "real_tokens_per_s", "p20_tokens_per_s", "p80_tokens_per_s", "vs_fastprocon_off")
TRL_MISSING = "TRL is not installed: the trl-* variants are skipped (pip install --no-deps trl==1.16.0 adds it)"


def fastprocon_run(args, run_dir: Path, procon: bool, shared: dict) -> tuple[float, float, dict]:
    """(real tokens, seconds) of the timed steps of one ``fastprocon train`` run; ``shared`` keeps the
    directions and z0 cache of the first ProCon run for the next ones."""
    extra = ["schedule=constant"] if procon else ["schedule=off"]
    extra += [f"procon.{k}={v}" for k, v in shared.items()]
    cfg = load_config(args.config, [f"run_dir={run_dir}", f"max_steps={args.steps}", "log_every=1", "resume=never",
                                    "export=false", "safety_probe_every=0", "checkpoint_every=0",
                                    f"model.device={args.device_type}", *args.set, *extra])
    ctx = D.init_distributed(args.device_type)
    try:
        trainer = Trainer(cfg, ctx)
        result = trainer.fit()
        tokens = seconds = 0.0
        for record in result.metrics:
            step = record["step"]               # steps done: this line covers step index step - 1
            if step <= args.warmup:
                continue
            n = float(trainer._n_tok[trainer.batches.global_indices(step - 1)].sum())
            tokens, seconds = tokens + n, seconds + n / record["tokens_per_s"]
        if procon and trainer.procon is not None and not shared:
            shared.update(directions=trainer.procon.directions_path, reference_cache=trainer.procon.reference_path)
        info = {"model": trainer.model_name, "batch": cfg.train.batch_size, "micro_batch": cfg.train.micro_batch_size,
                "max_length": cfg.data.max_length}
        del trainer
    finally:
        D.shutdown(ctx)
    return tokens, seconds, info


def training_set(args, run_dir: Path):
    """The fastprocon trainer's tokenized training set and config (what TRL is given)."""
    from fastprocon.train.prepare import load_training_data
    cfg = load_config(args.config, [f"run_dir={run_dir}", *args.set])
    loaded = load_model(cfg.model.spec)
    return load_training_data(cfg, loaded.tokenizer).examples, cfg


def trl_run(args, packed: bool, procon: bool, examples, cfg, out_dir: Path, shared: dict) -> tuple[float, float]:
    """(real tokens, seconds) of the timed steps of one SFTTrainer run (with ProCon added by
    fastprocon.integrations when ``procon``)."""
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    cuda = args.device_type == "cuda"
    loaded = load_model(cfg.model.spec, device=args.device_type)
    rows = [examples[i] for i in range(len(examples))]
    dataset = datasets.Dataset.from_dict({"input_ids": [ex.input_ids for ex in rows],
                                          "labels": [ex.labels for ex in rows]})
    t, o = cfg.train, cfg.optim
    sft = SFTConfig(output_dir=str(out_dir), max_steps=args.steps, per_device_train_batch_size=t.micro_batch_size,
                    gradient_accumulation_steps=t.batch_size // t.micro_batch_size, learning_rate=o.lr,
                    warmup_steps=o.lr_warmup_steps, weight_decay=o.weight_decay, max_grad_norm=o.grad_clip or 1e9,
                    lr_scheduler_type="cosine", seed=t.seed, logging_steps=1, save_strategy="no", report_to=[],
                    max_length=cfg.data.max_length, packing=packed, bf16=cuda, use_cpu=not cuda,
                    optim="adamw_torch_fused" if cuda else "adamw_torch", dataloader_num_workers=0,
                    disable_tqdm=True)
    counted = torch.zeros((), dtype=torch.int64, device=args.device_type)

    def count_tokens(module, a, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs["input_ids"] if "input_ids" in kwargs else a[0]
        counted.add_(mask.sum() if mask is not None else ids.numel())

    times, marks = [], {}

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            harness.synchronize(torch.device(args.device_type))
            marks["start"] = time.perf_counter()

        def on_step_end(self, state_args, state, *_, **__):
            harness.synchronize(torch.device(args.device_type))
            times.append(time.perf_counter() - marks["start"])
            if state.global_step == args.warmup:
                marks["tokens_at_warmup"] = int(counted)

    handle = loaded.model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    trainer = SFTTrainer(model=loaded.model, args=sft, train_dataset=dataset, processing_class=loaded.tokenizer,
                         callbacks=[StepTimes()])
    if procon:
        p = cfg.procon
        add_procon(trainer, schedule="constant", alpha=p.alpha, layers=p.layers, norm=p.norm, delta=p.delta,
                   reduction=p.reduction, **({"directions": str(shared["directions"])} if shared else {}))
    counted.zero_()   # the pre-pass's forwards are not training tokens
    trainer.train()
    handle.remove()
    tokens = int(counted) - marks.get("tokens_at_warmup", 0)
    return float(tokens), sum(times[args.warmup:])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--config", default="default", help="fastprocon train config: tiny, default (SmolLM2) or a .toml")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, for every variant")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps of each run (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="runs of every variant, order flipped each round")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/trl_<device tag>.csv)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 0 or args.rounds < 1:
        raise SystemExit("--steps must exceed --warmup >= 0, and --rounds must be >= 1")
    device = harness.start(args)
    args.device_type = device.type
    variants = list(args.variants)
    trl_version = ""
    if importlib.util.find_spec("trl") is None:
        print(TRL_MISSING, file=sys.stderr)
        variants = [v for v in variants if not v.startswith("trl-")]
    else:
        import trl
        trl_version = trl.__version__
    if not variants:
        return 0
    rates = {v: [] for v in variants}
    shared, info = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        tmp = Path(tmp)
        with_trl = any(v.startswith("trl-") for v in variants)
        examples, cfg = training_set(args, tmp / "data") if with_trl else (None, None)
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                run_dir = tmp / f"{v}-{r}"
                if v.startswith("fastprocon-"):
                    tokens, seconds, info = fastprocon_run(args, run_dir, v == "fastprocon-procon", shared)
                else:
                    tokens, seconds = trl_run(args, v.startswith("trl-packed"), v.endswith("-procon"), examples, cfg,
                                              run_dir, shared)
                rates[v].append(tokens / seconds)
                print(f"round {r + 1}/{args.rounds} {v}: {tokens / seconds:.0f} real tokens/s", file=sys.stderr)
    if cfg is not None and not info:
        info = {"model": cfg.model.spec, "batch": cfg.train.batch_size, "micro_batch": cfg.train.micro_batch_size,
                "max_length": cfg.data.max_length}
    env = harness.environment(device, "benchmarks/bench_trl.py", argv)
    base = statistics.median(rates["fastprocon-off"]) if "fastprocon-off" in rates else None
    rows = []
    for v in variants:
        q = harness.quantiles(rates[v])
        rows.append({**env, "config": args.config, **info, "variant": v, "trl_version": trl_version,
                     "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                     "real_tokens_per_s": f"{q.median_ms:.1f}", "p20_tokens_per_s": f"{q.p20_ms:.1f}",
                     "p80_tokens_per_s": f"{q.p80_ms:.1f}",
                     "vs_fastprocon_off": f"{q.median_ms / base:.3f}" if base else ""})
    lines = [f"{'variant':<20} {'real tok/s':>11} {'p20-p80':>17} {'vs off':>7}"]
    lines += [f"{r['variant']:<20} {float(r['real_tokens_per_s']):>11.0f} "
              f"{float(r['p20_tokens_per_s']):>8.0f}-{float(r['p80_tokens_per_s']):<8.0f} {r['vs_fastprocon_off']:>7}"
              for r in rows]
    harness.save_rows(args.out or harness.RESULTS_DIR / f"trl_{harness.device_tag(device)}.csv", rows, FIELDS,
                      "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
