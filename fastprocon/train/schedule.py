"""Schedules over optimizer steps: the learning rate and the ProCon weight alpha.

Both are plain functions of the step number, so a resumed run picks up exactly where the
interrupted one was.
"""
from __future__ import annotations

import math

import torch

from fastprocon.train.config import ProConConfig


class WarmupCosine:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up from 0 to 1 over
    ``warmup_steps``, then cosine decay from 1 to ``min_ratio`` at ``total_steps``.

    A plain object (not a lambda) so the scheduler's state_dict records its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def follow_config(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float, schedule: WarmupCosine) -> list[str]:
    """Make a scheduler just restored from a checkpoint follow the config: ``load_state_dict``
    brings back the checkpoint's base LR and WarmupCosine settings, so without this a resumed
    run would keep the old schedule. Sets the optimizer's LR for the restored step; returns what
    changed (e.g. ["lr 0.003 -> 0.001", "total steps 8 -> 12"]), empty when nothing did."""
    old = scheduler.lr_lambdas[0]
    changes = [f"lr {b:g} -> {lr:g}" for b in sorted(set(scheduler.base_lrs)) if b != lr]
    for attr, label in (("warmup_steps", "lr_warmup_steps"), ("total_steps", "total steps"),
                        ("min_ratio", "min_lr_ratio")):
        if getattr(old, attr, None) != getattr(schedule, attr):
            changes.append(f"{label} {getattr(old, attr, None)} -> {getattr(schedule, attr)}")
    if changes:
        scheduler.lr_lambdas = [schedule] * len(scheduler.optimizer.param_groups)
        scheduler.base_lrs = [lr] * len(scheduler.optimizer.param_groups)
        for group in scheduler.optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * schedule(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return changes


class AlphaSchedule:
    """alpha per optimizer step (0-based) for the ProCon variants.

    - "constant" (ProCon_s): ``alpha`` at every step.
    - "warmup" (ProCon_wu): ``alpha`` for the first ``alpha_warmup_steps`` steps (or
      ``alpha_warmup_epochs`` epochs, rounded up to whole steps), then ``alpha_after``.
    - "off": 0 (plain instruction fine-tuning).
    A step with alpha = 0 runs no penalty code at all.
    """

    def __init__(self, cfg: ProConConfig, steps_per_epoch: int):
        self.schedule = cfg.schedule
        self.alpha, self.alpha_after = cfg.alpha, cfg.alpha_after
        if cfg.alpha_warmup_steps > 0:
            self.warmup_steps = cfg.alpha_warmup_steps
        else:
            self.warmup_steps = math.ceil(cfg.alpha_warmup_epochs * steps_per_epoch)

    def __call__(self, step: int) -> float:
        if self.schedule == "off":
            return 0.0
        if self.schedule == "warmup" and step >= self.warmup_steps:
            return self.alpha_after
        return self.alpha

    def describe(self) -> str:
        if self.schedule == "off":
            return "ProCon off (alpha = 0)"
        if self.schedule == "constant":
            return f"ProCon_s: alpha = {self.alpha} at every step"
        return (f"ProCon_wu: alpha = {self.alpha} for steps 1-{self.warmup_steps}, then {self.alpha_after}"
                + (" (penalty skipped)" if self.alpha_after == 0 else ""))
