"""Small statistics for the powered experiment: Wilson intervals, mean/std over seeds, recovery,
Welch's t test with Welch-Satterthwaite degrees of freedom (Student t from the regularized incomplete
beta function) and a seed-and-prompt bootstrap.

All pure Python (no scipy): the report must run wherever the driver runs.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable

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
    if all(v == values[0] for v in values):
        return values[0], 0.0   # exactly: rounding in the mean must not make a spread (Welch divides by it)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def recovery(asr_ift: float, asr_variant: float, asr_aligned: float) -> float | None:
    """(ASR_IFT - ASR_variant) / (ASR_IFT - ASR_aligned): 1 = all refusal lost to IFT recovered,
    0 = none, < 0 = worse than IFT. None when IFT lost nothing (the ratio is undefined)."""
    lost = asr_ift - asr_aligned
    return None if abs(lost) < 1e-12 else (asr_ift - asr_variant) / lost


def _beta_continued_fraction(a: float, b: float, x: float, eps: float = 1e-15, max_terms: int = 500) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz; converges fast for x < (a + 1) / (a + b + 2))."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0 <= x <= 1):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_continued_fraction(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom (any real df)."""
    if not df > 0:
        raise ValueError(f"t distribution needs df > 0, got {df}")
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))   # P(T > |t|)
    return 1 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on t_cdf)."""
    if not 0 < p < 1:
        raise ValueError(f"quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


def welch(a: list[float], b: list[float], level: float = 0.95) -> dict | None:
    """Welch's test of mean(a) - mean(b): t, Welch-Satterthwaite degrees of freedom, two-sided p and the
    critical |t| at ``level``. None with fewer than two values on a side or no spread on both.
    A side without spread contributes nothing to the standard error (df = the other side's n - 1)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if sa is None or sb is None:
        return None
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0:
        return None
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return {"t": t, "df": df, "p": 2 * (1 - t_cdf(abs(t), df)), "t_crit": t_quantile(0.5 + level / 2, df)}


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, linear between order statistics."""
    position = q * (len(sorted_values) - 1)
    below = math.floor(position)
    above = min(below + 1, len(sorted_values) - 1)
    return sorted_values[below] + (position - below) * (sorted_values[above] - sorted_values[below])


def seed_prompt_bootstrap(groups: dict[str, list[dict]], statistic: Callable[[dict], float | None],
                          draws: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of ``statistic`` over seeds and prompts.

    ``groups``: {variant: [one dict per seed (cell): {metric: a number (e.g. the cell's CE) or
    (prompt set name, [0/1 per prompt])}]}; every cell has the same metrics, and a prompt set has the
    same prompts in the same order in every cell. ``statistic``: {variant: {metric: mean over the
    variant's cells}} -> a number, or None where it is undefined.
    Each draw resamples every variant's cells with replacement (independently) and every prompt set's
    prompts with replacement, the same prompt indices for every cell (the cells were scored on the same
    prompts, so their prompt-level noise is shared, not independent).
    -> {estimate (on the data), low, high (None when under half the draws are defined), draws,
        undefined (draws where the statistic was None)}."""
    sizes: dict[str, int] = {}
    hits: dict[str, list[dict]] = {}
    for name, cells in groups.items():
        if not cells:
            raise ValueError(f"bootstrap: variant {name} has no cells")
        hits[name] = []
        for cell in cells:
            if set(cell) != set(cells[0]):
                raise ValueError(f"bootstrap: the cells of {name} have different metrics")
            entry = {}
            for metric, value in cell.items():
                if isinstance(value, tuple):
                    prompt_set, outcomes = value
                    if sizes.setdefault(prompt_set, len(outcomes)) != len(outcomes):
                        raise ValueError(f"bootstrap: prompt set {prompt_set} has {len(outcomes)} prompts in a "
                                         f"cell of {name}, {sizes[prompt_set]} elsewhere")
                    entry[metric] = (prompt_set, [i for i, x in enumerate(outcomes) if x])
                else:
                    entry[metric] = float(value)
            hits[name].append(entry)

    def means(chosen: dict[str, list[int]], weights: dict[str, list[int]] | None) -> dict:
        out = {}
        for name, cells in hits.items():
            out[name] = {}
            for metric in cells[0]:
                total = 0.0
                for k in chosen[name]:
                    v = cells[k][metric]
                    if isinstance(v, tuple):
                        w = weights[v[0]] if weights else None
                        total += (sum(w[i] for i in v[1]) if w else len(v[1])) / sizes[v[0]]
                    else:
                        total += v
                out[name][metric] = total / len(chosen[name])
        return out

    rng = random.Random(seed)
    estimate = statistic(means({n: list(range(len(c))) for n, c in hits.items()}, None))
    values, undefined = [], 0
    for _ in range(draws):
        chosen = {n: [rng.randrange(len(c)) for _ in c] for n, c in hits.items()}
        weights = {}
        for prompt_set, n in sorted(sizes.items()):
            w = [0] * n
            for i in rng.choices(range(n), k=n):
                w[i] += 1
            weights[prompt_set] = w
        value = statistic(means(chosen, weights))
        if value is None:
            undefined += 1
        else:
            values.append(value)
    values.sort()
    enough = len(values) >= draws / 2
    return {"estimate": estimate, "low": percentile(values, (1 - level) / 2) if enough else None,
            "high": percentile(values, (1 + level) / 2) if enough else None, "draws": draws, "undefined": undefined}
