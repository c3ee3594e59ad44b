"""Small statistics for the powered experiment: Wilson intervals, mean/std over seeds, recovery.

All pure Python (no scipy): the report must run wherever the driver runs.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054   # two-sided 95% normal quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial share ``successes / n`` -> (low, high); None when n = 0.

    Unlike the normal interval it stays inside [0, 1] and is sensible at 0 or n successes.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def recovery(asr_ift: float, asr_variant: float, asr_aligned: float) -> float | None:
    """(ASR_IFT - ASR_variant) / (ASR_IFT - ASR_aligned): 1 = all refusal lost to IFT recovered,
    0 = none, < 0 = worse than IFT. None when IFT lost nothing (the ratio is undefined)."""
    lost = asr_ift - asr_aligned
    return None if abs(lost) < 1e-12 else (asr_ift - asr_variant) / lost


def welch_t(a: list[float], b: list[float]) -> float | None:
    """Welch's t statistic of mean(a) - mean(b) (None with fewer than two values on a side or no spread)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if sa is None or sb is None:
        return None
    se = math.sqrt(sa * sa / len(a) + sb * sb / len(b))
    return None if se == 0 else (ma - mb) / se
