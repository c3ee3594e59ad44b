"""fastprocon: fast ProCon fine-tuning (Du et al. 2025, arXiv 2509.06795).

The fused projection penalty is the public core:

    from fastprocon import procon_penalty, anchor_projection
    loss = ce + procon_penalty(hidden, direction, z0, mask, scale=alpha / n_samples)

See docs/design.md for the modules behind the trainer and tools.
"""
from fastprocon.penalty import ProConPenalty, anchor_projection, procon_penalty, procon_penalty_ref

__all__ = ["procon_penalty", "anchor_projection", "ProConPenalty", "procon_penalty_ref"]
__version__ = "0.1.0"
