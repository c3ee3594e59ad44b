"""ProCon's settings (the trainer's ``[procon]`` section, the integrations' keyword arguments), their
checks, and the normalisation of the penalty: one definition for the trainer and the integrations."""
from __future__ import annotations

import math
from dataclasses import dataclass

PROCON_CHOICES = {
    "schedule": ("constant", "warmup", "off"),
    "norm": ("l1", "l2sq", "huber", "band"),
    "reduction": ("sample", "token"),
    "backend": ("auto", "triton", "torch", "reference"),
    "reference": ("cache", "adapters_off"),
    "reference_dtype": ("fp32", "bf16"),
}
REDUCTIONS = PROCON_CHOICES["reduction"]


@dataclass
class ProConConfig:
    schedule: str = "constant"             # "constant" (ProCon_s), "warmup" (ProCon_wu), "off" (plain IFT)
    alpha: float = 0.1                     # constant alpha, or the warm-up alpha
    alpha_after: float = 0.0               # alpha after the warm-up (0 = the penalty is skipped entirely)
    alpha_warmup_steps: int = 0            # warm-up length in optimizer steps ...
    alpha_warmup_epochs: float = 0.0       # ... or in epochs (exactly one of the two for "warmup")
    layers: str | list[int] = "all"        # "all" = every layer that has a direction, or layer indices
    norm: str = "l1"                       # "l1" (paper), "l2sq", "huber", "band"
    delta: float = 1.0                     # huber delta
    band_fraction: float = 0.05            # band half-width at each layer: this fraction of z0's std there
    reduction: str = "sample"              # "sample": mean over samples (paper); "token": mean over tokens
    backend: str = "auto"                  # penalty backend: "auto", "triton", "torch", "reference"
    directions: str = ""                   # an existing directions file; "" = <run dir>/directions.safetensors
    harmful: str = "harmful"               # prompts for making directions when the file is absent
    harmless: str = "harmless"
    direction_batch_size: int = 16
    reference: str = "cache"               # z0 from "cache" or computed with LoRA "adapters_off"
    reference_cache: str = ""              # an existing cache file; "" = <run dir>/reference.safetensors
    reference_dtype: str = "fp32"          # cache storage: "fp32" or "bf16"


def validate_procon(p: ProConConfig, *, lora: bool) -> None:
    """Check the values of ``p`` (``lora``: the model trains LoRA adapters); a bad one is a ValueError
    naming the key, its value and what it must be."""
    for key, allowed in PROCON_CHOICES.items():
        value = getattr(p, key)
        if value not in allowed:
            raise ValueError(f"config procon.{key} = {value!r}: expected one of {', '.join(map(repr, allowed))}")

    def need(ok: bool, dotted: str, what: str) -> None:
        if not ok:
            raise ValueError(f"config {dotted} = {getattr(p, dotted.split('.')[1])!r}: must be {what}")

    finite = math.isfinite
    need(finite(p.alpha) and p.alpha >= 0, "procon.alpha", "a finite number >= 0")
    need(finite(p.alpha_after) and p.alpha_after >= 0, "procon.alpha_after", "a finite number >= 0")
    need(p.alpha_warmup_steps >= 0, "procon.alpha_warmup_steps", ">= 0")
    need(finite(p.alpha_warmup_epochs) and p.alpha_warmup_epochs >= 0, "procon.alpha_warmup_epochs", ">= 0")
    if p.schedule == "warmup":
        need((p.alpha_warmup_steps > 0) != (p.alpha_warmup_epochs > 0), "procon.alpha_warmup_steps",
             "> 0 with alpha_warmup_epochs = 0, or 0 with alpha_warmup_epochs > 0 (exactly one warm-up length "
             "for schedule = 'warmup')")
    if isinstance(p.layers, str):
        need(p.layers == "all", "procon.layers", "'all' or a list of layer indices")
    else:
        need(len(p.layers) > 0 and all(i >= 0 for i in p.layers) and len(set(p.layers)) == len(p.layers),
             "procon.layers", "a non-empty list of distinct layer indices >= 0")
    need(finite(p.delta) and p.delta > 0, "procon.delta", "> 0")
    need(finite(p.band_fraction) and p.band_fraction > 0, "procon.band_fraction", "a finite number > 0")
    if p.norm == "band" and p.reference != "cache":
        raise ValueError(f"config procon.norm = 'band' needs procon.reference = 'cache', got {p.reference!r}: the "
                         "band's per-layer widths come from the spread of the z0 cache")
    need(p.direction_batch_size >= 1, "procon.direction_batch_size", ">= 1")
    need(p.reference == "cache" or lora, "procon.reference",
         "'cache' unless model.lora = true (only LoRA keeps the initial model: adapters off)")


def procon_scale(alpha: float, reduction: str, world_size: int, n_samples: int, n_response: int) -> float:
    """The factor on one process's summed ProCon penalty for optimizer step totals of
    ``n_samples`` samples and ``n_response`` response tokens over all processes."""
    if reduction == "sample":
        return alpha * world_size / n_samples
    if reduction == "token":
        return alpha * world_size / max(n_response, 1)
    raise ValueError(f"unknown ProCon reduction {reduction!r}; expected one of {REDUCTIONS}")
