"""The learning-rate schedule over optimizer steps (alpha's is fastprocon.procon.schedule): a plain
function of the step number, so a resumed run picks up exactly where the interrupted one was."""
from __future__ import annotations

import math

import torch


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
