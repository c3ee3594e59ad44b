"""ProCon on a model you train yourself: directions, hooks, z0, schedule and normalisation.

:class:`ProCon` attaches to a transformers causal LM (plain or PEFT/LoRA) and its tokenizer:

- refusal directions: loaded from a file (checked against the model: fingerprint, layers,
  hidden size) or made from the built-in harmful/harmless prompts (saved when a path is given);
- hooks: fastprocon's :class:`~fastprocon.procon.hooks.ProConHooks` at the constrained decoder-layer
  inputs, plus one forward pre-hook on the model itself that arms them for each training
  forward from the forward's own ``labels`` (response mask = labels != -100 at the input
  positions, as ``fastprocon train``) and the batch's z0;
- z0: ``reference="cache"`` (default for full fine-tuning) records the initial model's
  projections in one no-grad pre-pass over the training batches (:meth:`ProCon.record_reference`;
  time: one forward pass over the data; memory: n_layers x response tokens x 4 bytes, in a
  cache file read into CPU memory), keyed by each sample's token content, so any collator,
  shuffle, padding or packing finds them; ``"adapters_off"`` (default under PEFT) computes them
  per micro-batch from the same model with its adapters disabled (one extra no-grad forward per
  micro-batch, about a third of a training step; no stored state);
- per optimizer step (:meth:`ProCon.begin_step`): alpha from fastprocon's ``AlphaSchedule``
  (ProCon_s = "constant", ProCon_wu = "warmup" by steps or epochs), scale = alpha / the step's
  sample count (or response-token count, ``reduction="token"``) from ``train/loss.py``'s
  ``procon_scale``: the same normalisation as ``fastprocon train``;
- logging: :meth:`ProCon.log_values` gives the mean penalty per sample and alpha since the last call.

The penalty's gradient is injected into the backward pass (``anchor_projection``), so the
loss you call ``backward()`` on stays your CE: it must be backpropagated with gradient 1 (no
fp16 loss scaler, no DeepSpeed). One process only: FSDP, DeepSpeed and multi-process data
parallel are refused (use ``fastprocon train`` under torchrun for those).
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from fastprocon.integrations.samples import batch_samples, gather_z0, prepass_kwargs, record_reference
from fastprocon.models.layers import unwrap_model
from fastprocon.models.load import LoadedModel, model_fingerprint
from fastprocon.procon.config import ProConConfig, procon_scale, validate_procon
from fastprocon.procon.hooks import ProConHooks, stack_recorded
from fastprocon.procon.reference import ReferenceCache
from fastprocon.procon.schedule import AlphaSchedule
from fastprocon.procon.setup import band_widths, constrained_layers, directions_for, initial_model
from fastprocon.refusal.directions import directions_hash


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def refuse_sharded(model: nn.Module) -> None:
    """FSDP (1 or 2), DeepSpeed and multi-process runs are out of scope: a clear error."""
    names = {type(m).__name__ for m in (model, unwrap_model(model))}
    if any(n.startswith("FSDP") or n in ("FullyShardedDataParallel", "DeepSpeedEngine") for n in names) or any(
            type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError("fastprocon.integrations supports a single-process, unsharded model; this one is wrapped "
                         "by FSDP or DeepSpeed: use `fastprocon train` (FSDP2 under torchrun) for sharded runs")
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError(f"fastprocon.integrations runs in one process; this is one of "
                         f"{torch.distributed.get_world_size()} (torchrun/DDP): use `fastprocon train` under torchrun")


_ATTACHED = "_fastprocon_procon"   # the ProCon whose hooks a model carries


class ProCon:
    """ProCon for your own training loop (see the module docstring).

    Args:
        model: the transformers causal LM being trained (PEFT-wrapped or not), at its initial weights.
        tokenizer: its tokenizer; must have a chat template (directions are read at the last
            token of the chat-formatted prompt).
        steps_per_epoch: optimizer steps per epoch, needed only for ``alpha_warmup_epochs``.
        reference_cache: where the pre-pass writes z0 (or reads it, when the file exists and
            matches this model and directions); None = a temporary file.
        **settings: the keys of ``fastprocon train``'s ``[procon]`` section (procon/config.py's
            ProConConfig), with the same defaults: alpha=0.1, schedule="constant" | "warmup" |
            "off", alpha_after, alpha_warmup_steps, alpha_warmup_epochs, layers="all" or
            [indices], norm, delta, band_fraction, reduction, backend, directions (a file; made
            there when absent; "" = made in memory), harmful, harmless, direction_batch_size,
            reference="cache" | "adapters_off" (default: "adapters_off" under PEFT, else "cache";
            norm="band" needs "cache": its widths come from the recorded z0).
    """

    def __init__(self, model: nn.Module, tokenizer, *, steps_per_epoch: int | None = None,
                 reference_cache: str | Path | None = None, **settings):
        refuse_sharded(model)
        if getattr(unwrap_model(model), _ATTACHED, None) is not None:
            raise ValueError("this model already has ProCon hooks (a ProCon made earlier); call .remove() on that "
                             "one first: a second set would add the penalty's gradient twice")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template: ProCon reads refusal "
                             "directions at the last token of the chat-formatted prompt; set tokenizer.chat_template")
        settings.setdefault("reference", "adapters_off" if is_peft(model) else "cache")
        cfg = ProConConfig(**settings)
        validate_procon(cfg, lora=is_peft(model))
        if cfg.schedule == "warmup" and cfg.alpha_warmup_epochs > 0 and not steps_per_epoch:
            raise ValueError("alpha_warmup_epochs needs steps_per_epoch (optimizer steps per epoch); or give "
                             "alpha_warmup_steps instead")
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.schedule = AlphaSchedule(cfg, steps_per_epoch or 1)
        self.device = next(model.parameters()).device
        name = getattr(unwrap_model(model).config, "_name_or_path", "") or type(unwrap_model(model)).__name__
        self.loaded = LoadedModel(model, tokenizer, name, model_fingerprint(model))
        self.directions = directions_for(self.loaded, cfg, Path(cfg.directions) if cfg.directions else None,
                                         initial=self._initial_model)
        self.layers = constrained_layers(cfg.layers, self.directions)
        rows = self.directions.directions[self.layers].to(self.device)
        self.hooks = ProConHooks(model, self.layers, rows, norm=cfg.norm, delta=cfg.delta, backend=cfg.backend)
        self._exit = contextlib.ExitStack()
        self._exit.enter_context(self.hooks.installed())
        self._handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                         model.register_forward_hook(self._after_forward, always_call=True)]
        unwrap_model(model).__dict__[_ATTACHED] = self     # not a submodule: kept out of state_dict
        self._tmp = None
        self.reference_path = Path(reference_cache) if reference_cache else None
        self.reference: ReferenceCache | None = None
        self._busy = False                 # our own forwards (pre-pass, adapters-off z0) pass the hooks by
        self._step: int | None = None
        self._scale: Tensor | None = None
        self._penalty_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self._samples = 0

    # -- set-up ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _initial_model(self):
        """The initial model (procon.setup.initial_model), with our own hooks passed by."""
        self._busy = True
        try:
            with initial_model(self.model):
                yield
        finally:
            self._busy = False

    @property
    def needs_reference(self) -> bool:
        """True when z0 comes from a cache that :meth:`record_reference` has yet to fill."""
        return self.cfg.reference == "cache" and self.reference is None

    def record_reference(self, batches: Iterable[dict]) -> None:
        """The z0 pre-pass over the training batches (collated dicts with labels), on the
        initial model; or, when ``reference_cache`` names an existing file, load and check it."""
        identity = {"model_fingerprint": self.loaded.fingerprint, "directions_hash": directions_hash(self.directions),
                    "layers": self.layers}
        path = self.reference_path
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fastprocon-z0-")
            path = Path(self._tmp.name) / "reference.safetensors"
        if not path.exists():
            header = {"model": self.loaded.name, **identity, "dataset_hash": "content-keyed", "max_length": 0,
                      "keys": "sha1(input_ids, response mask)", "storage_dtype": self.cfg.reference_dtype}
            with self._initial_model(), torch.random.fork_rng(devices=[]):   # leave the data order as it was
                record_reference(self.model, self.hooks, batches, path, header)
        self.reference = ReferenceCache.load(path, dataset_hash=None, max_length=None,
                                             storage_dtype=self.cfg.reference_dtype, **identity)
        if self.cfg.norm == "band":   # the band's per-layer widths: a fraction of z0's spread in this cache
            self.hooks.set_widths(band_widths(self.reference, self.layers, self.cfg.band_fraction).to(self.device))

    def remove(self) -> None:
        """Take every hook off the model."""
        for handle in self._handles:
            handle.remove()
        self._exit.close()
        if unwrap_model(self.model).__dict__.get(_ATTACHED) is self:
            del unwrap_model(self.model).__dict__[_ATTACHED]

    # -- per optimizer step ----------------------------------------------------------------------

    def begin_step(self, step: int, micro_batches: list[dict]) -> float:
        """Set up optimizer step ``step`` (0-based) whose forwards see ``micro_batches`` (the
        collated dicts; their sample and response-token counts are the normalisers). Returns alpha."""
        self.hooks.disarm()
        self._step, self._scale = step, None
        alpha = self.schedule(step)
        if alpha == 0:
            return alpha
        n_samples = n_response = 0
        for i, mb in enumerate(micro_batches):
            segments, _, mask = batch_samples(mb)
            response = int(mask.sum())
            if response == 0:
                raise ValueError(f"optimizer step {step}: micro-batch {i} has no response tokens (every label is "
                                 "-100); ProCon constrains response tokens: check the collator's completion mask")
            n_samples += len(segments)
            n_response += response
        self._scale = torch.full((), procon_scale(alpha, self.cfg.reduction, 1, n_samples, n_response),
                                 dtype=torch.float32, device=self.device)
        self._samples += n_samples
        return alpha

    def log_values(self) -> dict:
        """{"procon": mean over the samples since the last call of the penalty summed over layers
        and response tokens (alpha not included; None when ProCon was off), "procon_alpha"}.
        One host sync."""
        value = float(self._penalty_sum) / self._samples if self._samples else None
        self._penalty_sum.zero_()
        self._samples = 0
        return {"procon": value, "procon_alpha": self.schedule(max(self._step or 0, 0))}

    # -- the model's forward hooks ---------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._busy:
            return None
        self.hooks.disarm()
        if not (module.training and torch.is_grad_enabled()):
            return None                          # evaluation or generation: no constraint
        if self._step is None:
            raise RuntimeError("call ProCon.begin_step(step, micro_batches) before the training forward pass")
        if self._scale is None:
            return None                          # alpha = 0 at this step
        batch = {**kwargs, "input_ids": kwargs.get("input_ids", args[0] if args else None)}
        if batch.get("labels") is None:
            raise ValueError("ProCon needs the response mask: pass labels=... (-100 on prompt and padding) to the "
                             "model's forward")
        z0, response = self._z0(batch)
        self.hooks.arm(response, z0, self._scale)
        return None

    def _after_forward(self, module: nn.Module, args: tuple, output):
        # armed hooks stay armed until the next forward: activation checkpointing recomputes
        # the layers (and calls the hooks again) during this forward's backward
        if self.hooks.armed:     # the unscaled penalty of this forward's layers
            self._penalty_sum += self.hooks.take_penalty()
        return None

    def _z0(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(z0 [n_layers, B, T], response mask [B, T]) of a training batch."""
        if self.cfg.reference == "adapters_off":
            with self._initial_model(), self.hooks.recording() as recorded:
                self.model(**prepass_kwargs(batch, self.model))
            return stack_recorded(recorded), batch_samples(batch)[2].to(self.device)
        if self.reference is None:
            raise RuntimeError("no z0 yet: call ProCon.record_reference(training batches) before training "
                               "(add_procon does this for a Trainer)")
        return gather_z0(self.reference, batch)
