"""The training loop: FSDP2, ProCon at the decoder-layer inputs, checkpoints, metrics, export.

One optimizer step (see :meth:`Trainer.accumulate_gradients` and :meth:`Trainer.step`):
for each of this rank's micro-batches (packed rows or padded batches, train/batches.py), arm the
ProCon hooks (when alpha > 0) with the response mask, z0 and scale = alpha * world / divisor,
run the model (its output layer returning the CE sum, train/chunked_ce.py), CE sum * world /
global prediction count, backward; then clip, AdamW, LR schedule. The global counts are computed on
the host from the step's sample indices (every rank knows the whole batch plan), so a step
has no collective besides FSDP's own and no host sync; values reach the host only at logging
intervals and checkpoints, where non-finite losses or gradient norms stop the run.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import fastprocon.distributed as D
from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.data.prompts import context_length
from fastprocon.models.layers import hidden_size, num_layers, unwrap_model
from fastprocon.models.load import load_model
from fastprocon.penalty.functional import resolve_backend
from fastprocon.procon.config import procon_scale
from fastprocon.procon.hooks import ProConHooks, stack_recorded
from fastprocon.procon.schedule import AlphaSchedule
from fastprocon.train.batches import StepBatches, cached_z0
from fastprocon.train.checkpoint import CheckpointManager, check_same_inputs
from fastprocon.train.chunked_ce import OutputLayerLoss, check_chunked_ce_exact
from fastprocon.train.config import Config, to_toml, validate
from fastprocon.train.dashboard import draw_dashboard
from fastprocon.train.exactness import use_compiled_layers
from fastprocon.train.export import export_model
from fastprocon.train.metrics import (
    MetricsLog,
    attention_width,
    count_params,
    matmul_params,
    peak_flops,
    peak_memory_gib,
    reset_peak_memory,
    training_flops,
)
from fastprocon.train.packing import forward_kwargs, use_packing
from fastprocon.train.prefetch import Prefetcher
from fastprocon.train.prepare import initial_model, load_training_data, prepare_procon, run_dir_of, wrap_for_training
from fastprocon.train.probe import SHARE_KEY, SafetyProbe, probe_due
from fastprocon.train.resume import ResumingTrainer
from fastprocon.train.resume_changes import version_file
from fastprocon.train.schedule import WarmupCosine
from fastprocon.train.signals import StopRequest
from fastprocon.train.step import ce_targets, make_optimizer, micro_step, optimizer_update, pinned, to_device
from fastprocon.utils.io import atomic_path

_NO_BAD_STEP = 2**62


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; the message names the first such step."""


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int           # step the run resumed from (0 = fresh)
    final_step: int
    checkpoint: Path | None
    export_dir: Path | None
    seconds: float
    metrics: list[dict]       # the metric records written by this invocation
    stopped_by: str | None = None   # "SIGTERM"/"SIGINT" when a signal stopped the run at final_step
    stopped: str | None = None      # why the refusal guard stopped the run before max_steps, else None


class Trainer(ResumingTrainer):
    """Builds everything from a :class:`Config` on an initialised process group (see
    :func:`train`), then :meth:`fit` runs the loop."""

    def __init__(self, cfg: Config, ctx: D.DistContext, stop: StopRequest | None = None):
        validate(cfg)   # a Config edited after load_config gets load_config's checks and messages
        # a backend this device cannot run (triton on CPU) fails now, not at step 1 after the set-up
        resolve_backend(cfg.procon.backend, torch.empty(0, device=ctx.device))
        self.cfg, self.ctx = cfg, ctx
        self.stop = stop if stop is not None else StopRequest(ctx.device)
        self.run_dir = run_dir_of(cfg)
        self.say(f"run directory {self.run_dir} ({ctx.world_size} process(es) on {ctx.device.type})")
        note = D.elastic_note()   # a torchrun restart, or a launch whose restarts could not connect
        if note:
            self.say(note)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        torch.manual_seed(cfg.train.seed)

        # FSDP over all processes, or HSDP (parallel.replicate x parallel.shard)
        replicate, shard = D.mesh_shape(cfg.parallel.replicate, cfg.parallel.shard, ctx.world_size)
        mesh = D.training_mesh(replicate, shard, ctx.world_size, ctx.device)
        if mesh is not None:
            self.say(f"HSDP: {replicate} replicas x {shard} shards")
        # built on the meta device, wrapped (LoRA, checkpointing, FSDP2), then each process reads its shards
        attn = None if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
        loaded = load_model(cfg.model.spec, dtype=torch.float32, device=ctx.device, seed=cfg.train.seed,
                            attn_implementation=attn,
                            wrap=lambda model: wrap_for_training(cfg, model, ctx.device, mesh))
        self.model_name, self.model_fingerprint, self.tokenizer = loaded.name, loaded.fingerprint, loaded.tokenizer
        context = context_length(unwrap_model(loaded.model))
        if context is not None and cfg.data.max_length > context:   # positions past it were never trained
            raise ValueError(f"config data.max_length = {cfg.data.max_length} is more than the context of model "
                             f"{loaded.name} ({context} tokens); lower it to at most {context}")
        self.data = load_training_data(cfg, loaded.tokenizer)
        self.say(f"model {loaded.name}: {num_layers(loaded.model)} layers, hidden {hidden_size(loaded.model)}; "
                 f"data: {len(self.data.examples)} examples ({self.data.n_primary} from {cfg.data.train}"
                 f" + {self.data.n_safety} safety), {self.data.n_truncated} cut at {cfg.data.max_length} tokens")
        with initial_model(loaded.model):    # every process runs the same probe forwards (FSDP collectives)
            compiled, compile_note = use_compiled_layers(cfg.model.compile, loaded.model)
            packing, note = use_packing(cfg.data.packing, loaded.model)
            chunked_ce_off = check_chunked_ce_exact(loaded.model) if cfg.model.chunked_ce else None
        for line in (compile_note, note,
                     chunked_ce_off and f"chunked cross entropy off: {chunked_ce_off}; CE from the full logits"):
            if line:
                self.say(line)
        self.varlen_kwargs = getattr(loaded.model.config, "_attn_implementation", None) == "flash_attention_2"
        # default rows: micro_batch_size x max_length with flash-attn's varlen kernel; max_length on
        # sdpa/eager, which compute a packed row's attention densely (T^2 per row, masked)
        default_row = cfg.data.max_length * (cfg.train.micro_batch_size if self.varlen_kwargs else 1)
        tokens_per_row = (cfg.train.tokens_per_micro_batch or default_row) if packing else None
        self.batches = StepBatches(self.data.examples, batch_size=cfg.train.batch_size,
                                   micro_batch_size=cfg.train.micro_batch_size, world_size=ctx.world_size,
                                   rank=ctx.rank, seed=cfg.train.seed, pad_id=loaded.tokenizer.pad_token_id,
                                   tokens_per_row=tokens_per_row)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", ctx, cfg.checkpoint.keep_checkpoints)
        self._resume_from = self._plan_resume()   # before directions are made or anything is loaded
        spe = self.batches.steps_per_epoch
        self.max_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * spe))
        if self._resume_from is not None and self._resume_from[1]["step"] > self.max_steps:
            path, at = self._resume_from[0], self._resume_from[1]["step"]
            given = f"train.max_steps = {cfg.train.max_steps}" if cfg.train.max_steps else \
                f"train.epochs = {cfg.train.epochs} ({self.max_steps} steps)"
            raise ValueError(f"{given}, but the run in {self.run_dir} is already at step {at} ({path}); raise it to "
                             "go on, or set checkpoint.resume to an earlier checkpoint")
        self.alpha = AlphaSchedule(cfg.procon, spe)
        procon_used = any(self.alpha(s) > 0 for s in range(self.max_steps))
        self.procon = prepare_procon(cfg, loaded, self.data, self.run_dir, ctx, self.say) if procon_used else None
        self._inputs = D.on_main(self._procon_inputs)
        if self._resume_from is not None:   # the directions and z0 the run started with, unchanged
            D.on_main(lambda: check_same_inputs(*self._resume_from, self._inputs, run_dir=self.run_dir))

        model = loaded.model.train()
        self.compiled = compiled     # applied by wrap_for_training; kept where it gives the eager layers' output
        flops_base = (matmul_params(model), num_layers(model), attention_width(unwrap_model(model).config))
        self.model = model
        self.output_loss = OutputLayerLoss(model).install() if cfg.model.chunked_ce and not chunked_ce_off else None
        self.hooks = None
        if self.procon is not None:
            rows = self.procon.directions.directions[self.procon.layers].to(ctx.device)
            p = cfg.procon
            widths = self.procon.widths.to(ctx.device) if self.procon.widths is not None else None
            self.hooks = ProConHooks(model, self.procon.layers, rows, norm=p.norm, delta=p.delta, backend=p.backend,
                                     widths=widths)
        self.probe = None
        self._prefetch: Prefetcher | None = None    # within fit: the batches of the next steps, made ahead
        if cfg.train.safety_probe_every:
            self.probe = SafetyProbe(cfg, ctx, loaded, self.data.examples, self.procon, self.run_dir, self.say)

        params = [q for q in model.parameters() if q.requires_grad]
        o = cfg.optim
        self.optimizer = make_optimizer(params, ctx.device, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                        weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(o.lr_warmup_steps, self.max_steps, o.min_lr_ratio))
        self.params = params
        self.metrics = MetricsLog(self.run_dir, enabled=ctx.is_main, tensorboard=cfg.train.tensorboard)
        if self.metrics.tensorboard_note:
            self.say(self.metrics.tensorboard_note)
        n_params = count_params(model)
        self._flops_base = flops_base
        self._peak_flops = peak_flops(ctx.device)
        # per-example counts (int64 arrays, as loss.example_counts) for the host-side global normalisers
        ds = self.data.examples
        self._n_pred, self._n_resp, self._n_tok = ds.n_predicted, ds.n_response, ds.lengths
        plan = (f"packed into rows of up to {tokens_per_row} tokens" if packing else
                f"{ctx.world_size} x {self.batches.grad_accum} micro-batches of {cfg.train.micro_batch_size}")
        self.say(f"{n_params / 1e6:.1f}M parameters ({sum(q.numel() for q in params) / 1e6:.2f}M trained"
                 f"{', LoRA' if cfg.model.lora else ''}); {self.max_steps} steps of {cfg.train.batch_size} samples "
                 f"({plan}{', compiled layers' if self.compiled else ''}); {self.alpha.describe()}")
        self._reset_interval()

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(f"[fastprocon train] {message}")

    # -- one optimizer step ----------------------------------------------------------------------

    def prepare_step(self, step: int) -> dict:
        """The host side of optimizer step ``step``: this rank's micro-batches (token reads, packing,
        collation, the CE's targets, the response mask, the z0 gather from the reference cache; pinned
        on CUDA) and the step's global counts. Device-free and reading shared state only, so the
        prefetch thread runs it ahead of the training thread (fit); :meth:`accumulate_gradients`
        calls it otherwise."""
        world, pin = self.ctx.world_size, self.ctx.device.type == "cuda"
        idx = self.batches.global_indices(step)
        alpha = self.alpha(step)
        scale = procon_scale(alpha, self.cfg.procon.reduction, world, len(idx), int(self._n_resp[idx].sum())) \
            if alpha > 0 else None
        micro_batches = []
        for mb in self.batches.micro_batches(step):
            inputs = forward_kwargs(mb, varlen_kwargs=self.varlen_kwargs)
            item = {"inputs": {k: pinned(v, pin) for k, v in inputs.items()}, "targets": mb["targets"],
                    "ce": ce_targets(mb["targets"], self.output_loss, pin), "weight": None, "z0": None}
            if scale is not None:
                item["weight"] = pinned(mb["labels"] != IGNORE_INDEX, pin)
                if self.procon.reference is not None:   # else recorded by the model itself (_recorded_z0)
                    item["z0"] = pinned(cached_z0(self.procon.reference, mb, len(self.procon.layers)), pin)
            micro_batches.append(item)
        return {"step": step, "micro_batches": micro_batches, "scale": scale, "n_samples": len(idx),
                "n_pred": int(self._n_pred[idx].sum()), "n_tok": int(self._n_tok[idx].sum()),
                "flops": training_flops(*self._flops_base, self._n_tok[idx].tolist()) / world}

    def accumulate_gradients(self, step: int) -> None:
        """Forward and backward of this rank's micro-batches of optimizer step ``step`` (0-based),
        adding into the parameters' gradients; accumulates logged sums on the device. The batches
        come from the prefetch thread within :meth:`fit` (train.prefetch > 0), else are made here."""
        prepared = self._prefetch.get(step) if self._prefetch is not None else self.prepare_step(step)
        dev, world = self.ctx.device, self.ctx.world_size
        scale = None
        if prepared["scale"] is not None:
            scale = torch.full((), prepared["scale"], dtype=torch.float32, device=dev)   # a fill: no host-device copy
            self._procon_samples += prepared["n_samples"]
        ce_factor = world / max(prepared["n_pred"], 1)
        micro_batches = prepared["micro_batches"]
        for mb in micro_batches:
            inputs = {k: to_device(v, dev) for k, v in mb["inputs"].items()}
            procon = {}
            if scale is not None:
                z0 = to_device(mb["z0"], dev) if mb["z0"] is not None else self._recorded_z0(inputs)
                procon = dict(hooks=self.hooks, weight=to_device(mb["weight"], dev), z0=z0, scale=scale)
            self._acc[0] += micro_step(self.model, inputs, mb["targets"], ce_factor, dev, output_loss=self.output_loss,
                                       aux_factor=1 / len(micro_batches), prepared_targets=mb["ce"], **procon)
        if scale is not None:
            self._acc[1] += self.hooks.take_penalty()    # unscaled: the logged penalty
        self._n_pred_acc += prepared["n_pred"]
        self._n_tok_acc += prepared["n_tok"]
        self._flops_acc += prepared["flops"]

    def _recorded_z0(self, inputs: dict) -> torch.Tensor:
        """z0 of a micro-batch from this model with its LoRA adapters off (the initial model)."""
        with torch.no_grad(), self.model.disable_adapter(), self.hooks.recording() as recorded:
            self.model(**inputs, use_cache=False, logits_to_keep=1)
        return stack_recorded(recorded)

    def step(self, step: int) -> None:
        """One optimizer step (0-based index ``step``)."""
        self.accumulate_gradients(step)
        norm = optimizer_update(self.params, self.optimizer, self.scheduler, self.cfg.optim.grad_clip or math.inf)
        self._norm_acc += norm
        bad = ~(torch.isfinite(norm) & torch.isfinite(self._acc[0]) & torch.isfinite(self._acc[1]))
        self._first_bad = torch.where(bad & (self._first_bad == _NO_BAD_STEP),
                                      torch.full_like(self._first_bad, step + 1), self._first_bad)
        self._steps_acc += 1

    # -- logging ---------------------------------------------------------------------------------

    def _reset_interval(self) -> None:
        dev = self.ctx.device
        self._acc = torch.zeros(2, dtype=torch.float32, device=dev)    # this rank's CE sum, ProCon sum
        self._norm_acc = torch.zeros((), dtype=torch.float32, device=dev)   # global grad norm, summed over steps
        self._first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=dev)
        self._n_pred_acc = self._n_tok_acc = self._procon_samples = self._steps_acc = 0
        self._flops_acc = 0.0       # model FLOPs of the real tokens, per process
        self._t0 = time.perf_counter()
        reset_peak_memory(dev)

    def flush_metrics(self, step: int) -> dict | None:
        """Host sync: reduce the interval's sums over ranks, stop on a non-finite value, write a
        metrics line (step = optimizer steps done)."""
        if self._steps_acc == 0:
            return None
        sums = D.all_reduce_sum(self._acc.clone())
        first_bad = self._first_bad.clone()
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
        sums, first_bad, norm_sum = sums.tolist(), int(first_bad), float(self._norm_acc)
        seconds = time.perf_counter() - self._t0
        if first_bad != _NO_BAD_STEP:
            latest = self.ckpt.latest()
            raise NonFiniteError(f"non-finite loss or gradient norm at step {first_bad}: stopping. The last good "
                                 f"checkpoint is {latest if latest else '(none yet)'}")
        n = self._steps_acc
        tokens_per_s = self._n_tok_acc / seconds
        record = {
            "step": step,
            "ce": sums[0] / max(self._n_pred_acc, 1),
            "procon": sums[1] / self._procon_samples if self._procon_samples else None,
            "alpha": self.alpha(step - 1),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": norm_sum / n,
            "tokens_per_s": tokens_per_s,
            "mfu": None,
            **peak_memory_gib(self.ctx.device),
        }
        if self._peak_flops is not None:
            record["mfu"] = self._flops_acc / seconds / self._peak_flops
        self.metrics.write(record)
        self._reset_interval()
        return record

    def run_probe(self, step: int) -> bool:
        """The safety probe after ``step`` steps: a metrics line, the bar's postfix, the refusal
        guard; its time is left out of the interval's throughput. Returns True to stop the run."""
        t0 = time.perf_counter()
        record = self.probe.measure(step)
        self._t0 += time.perf_counter() - t0
        if record is None:
            return False
        self.metrics.write(record)
        self._postfix["refusal"] = f"{record[SHARE_KEY]:.2f}"
        note, stop = self.probe.guard(record)
        if note:
            self.say(note)
        return stop

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg, t_start = self.cfg, time.perf_counter()
        start = self._resume()
        if self.ctx.is_main:   # only now: a run refused by the checks above leaves the record as it was
            # config.toml is the run's first config, never replaced; a resume with another config keeps that too
            first = self.run_dir / "config.toml"
            target = version_file(self.run_dir, start) if start and first.is_file() and self._config_changes else first
            if start == 0 or not first.is_file() or target != first:
                with atomic_path(target) as tmp:
                    Path(tmp).write_text(to_toml(cfg))
        written, done, stopped_by, stopped, self._postfix = [], start, None, None, {}
        every, log_every = cfg.checkpoint.checkpoint_every, cfg.train.log_every
        hooks = self.hooks.installed() if self.hooks is not None else contextlib.nullcontext()
        # the next steps' batches made by a background thread while this one computes (train.prefetch)
        prefetch = Prefetcher(self.prepare_step, range(start, self.max_steps), depth=cfg.train.prefetch,
                              on_start=self._worker_device) if cfg.train.prefetch else contextlib.nullcontext()
        # a signal during the steps only sets a flag, agreed on by all processes at each step boundary
        bar = tqdm(total=self.max_steps, initial=start, desc="train", unit="step", disable=not self.ctx.is_main)
        with hooks, prefetch as self._prefetch, self.stop.deferred(), bar:
            if self.probe is not None and start == 0:
                self.run_probe(0)
                bar.set_postfix(self._postfix)
            self._reset_interval()
            for s in range(start, self.max_steps):
                self.step(s)
                done = s + 1
                bar.update(1)
                stopped_by = self.stop.agreed()
                checkpoint_now = (every and done % every == 0) or done == self.max_steps or stopped_by is not None
                logged = done % log_every == 0 or checkpoint_now
                if logged:
                    written.append(self.flush_metrics(done))
                if self.probe is not None and probe_due(done, self.probe.every, self.max_steps) \
                        and self.run_probe(done):
                    stopped = f"harmful refusal share below train.min_refusal_share at step {done}"
                    if not logged:
                        written.append(self.flush_metrics(done))
                    checkpoint_now = True
                if written:
                    self._postfix["ce"] = f"{written[-1]['ce']:.3f}"
                bar.set_postfix(self._postfix, refresh=False)
                if checkpoint_now:
                    self.ckpt.save(done, self.model, self.optimizer, self._trainer_state(done))
                if stopped_by is not None or stopped:
                    break
            if stopped_by is None and not stopped and done > start:   # a signal during the last step or its checkpoint
                stopped_by = self.stop.agreed(now=True)
        self._prefetch = None
        latest = self.ckpt.latest()
        halted = stopped_by is not None or stopped is not None
        export_dir = self.export() if cfg.checkpoint.export and not halted else None
        self.metrics.close()
        if self.probe is not None and self.ctx.is_main:
            self.say(f"safety dashboard: {draw_dashboard(self.run_dir)}")
        return TrainResult(self.run_dir, start, done if halted else self.max_steps, latest, export_dir,
                           time.perf_counter() - t_start, written, stopped_by=stopped_by, stopped=stopped)

    def _worker_device(self) -> None:
        if self.ctx.device.type == "cuda":   # pinned buffers of the prefetch thread: this process's device
            torch.cuda.set_device(self.ctx.device)

    def export(self) -> Path:
        """The model in Hugging Face format in <run dir>/model, written by every process from its
        own shards (train/export.py). Collective."""
        path = self.procon.directions_path if self.procon is not None else None
        out = export_model(self.model, self.tokenizer, self.run_dir / "model", path,
                           adapter=self.cfg.checkpoint.export_adapter)
        return out

