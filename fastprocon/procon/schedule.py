"""ProCon's weight alpha over optimizer steps: a plain function of the step number, so a resumed run
picks up exactly where the interrupted one was."""
from __future__ import annotations

import math

from fastprocon.procon.config import ProConConfig


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
