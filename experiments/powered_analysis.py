"""The powered report's comparisons: two variants against each other, a variant against the baselines'
frontier, and the validation-split choice of the default. Every difference comes with Welch's t
(Welch-Satterthwaite degrees of freedom, over seeds) and a seed-and-prompt bootstrap interval; a
difference is called only when both agree (|t| above the critical value and the interval excluding 0).
"""
from __future__ import annotations

from powered_cells import ALIGNED, FAMILIES, cell_names, family, metric, samples, seed_values
from stats import mean_std, seed_prompt_bootstrap, welch

DRAWS = 2000
TASK_LOSS_SLACK = 0.05   # the default is chosen among variants with GSM8K test CE within 5% of IFT's
DEFAULT_VARIANT = "procon_wu_safe"   # what `fastprocon train` runs by default (fastprocon/configs/default.toml)
BAND_VARIANT = "procon_wu_safe_band"   # the same recipe with the band norm (choose_norm)
UNDEFINED_SHARE = 0.05   # frontier gaps: a decision needs a frontier in >= 95% of draws


def _rounded(w: dict | None) -> dict | None:
    return None if w is None else {k: round(v, 4) for k, v in w.items()}


def compare_pair(cells: dict, outcomes: dict, seeds: list[int], a: str, b: str,
                 metrics: tuple[str, ...] = ("asr", "over_refusal", "ce"), draws: int = DRAWS, seed: int = 0) -> dict:
    """mean(a) - mean(b) per metric with Welch's test over seeds and the bootstrap interval (CE has no
    per-prompt values: its bootstrap resamples seeds only). None where a side has no cells."""
    out = {}
    for m in metrics:
        va, vb = seed_values(cells, a, seeds, m), seed_values(cells, b, seeds, m)
        if not va or not vb or None in va + vb:
            out[m] = None
            continue
        w = welch(va, vb)
        sa, sb = samples(cells, outcomes, a, seeds, [m]), samples(cells, outcomes, b, seeds, [m])
        boot = None if sa is None or sb is None else seed_prompt_bootstrap(
            {a: sa, b: sb}, lambda means, m=m: means[a][m] - means[b][m], draws=draws, seed=seed)
        out[m] = {"diff": mean_std(va)[0] - mean_std(vb)[0], "n": (len(va), len(vb)), "welch": _rounded(w),
                  "bootstrap": boot, "verdict": verdict(w, boot)}
    return out


def verdict(w: dict | None, boot: dict | None) -> str:
    if w is None:
        return "no test (fewer than two seeds a side, or no spread over seeds on either side)"
    if boot is None or boot["low"] is None:
        return "no test (no per-prompt outcomes for the bootstrap)"
    beyond = abs(w["t"]) >= w["t_crit"]
    excludes = boot["low"] > 0 or boot["high"] < 0
    if beyond and excludes:
        return "differs"
    if beyond or excludes:
        return "undecided (Welch and the bootstrap disagree)"
    return "no difference shown"


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """The piecewise-linear line through ``points`` (CE, y), sorted by CE, at ``x``; None outside its
    CE range (no extrapolation)."""
    points = sorted(points)
    if len(points) < 2 or not points[0][0] <= x <= points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return (y0 + y1) / 2 if x1 == x0 else y0 + (x - x0) * (y1 - y0) / (x1 - x0)
    return None


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (CE, share) points that no other point beats on both (a lower CE and a lower share are both
    better), sorted by CE: a baseline that another one beats on both is no part of the frontier."""
    return sorted(p for p in points if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in points))


def frontier_at(front: list[tuple[float, float]], ce: float) -> float | None:
    """The frontier's share at ``ce``: the piecewise-linear line through the Pareto ``front`` inside its
    CE range, flat outside it: beyond its highest CE the front's lowest share (a baseline with a lower
    CE and that share exists there), below its lowest CE the front's highest share (a variant there
    under it beats every baseline on both; over it is a trade-off, which frontier_gap does not call);
    None without a front."""
    if not front:
        return None
    if ce <= front[0][0]:
        return front[0][1]
    return front[-1][1] if ce >= front[-1][0] else interpolate(front, ce)


def frontier_gap(cells: dict, outcomes: dict, seeds: list[int], variant: str, m: str,
                 draws: int = DRAWS, seed: int = 0) -> dict:
    """``variant``'s mean ``m`` minus the baselines' frontier at the variant's mean CE, with the
    bootstrap interval (seeds and prompts of the variant and of every baseline cell resampled).

    The baselines are its family's learning rates (IFT or IFT_safe) and the aligned model (no
    training: the low end of any training budget); the frontier is the piecewise-linear line through
    the Pareto front of their means, recomputed in every bootstrap draw. A baseline beaten on both CE
    and the share by another (more training that only overfits) is left out, so the frontier is the
    best any amount of plain training reached; outside the front's CE range it is flat
    (:func:`frontier_at`), and a variant with a lower CE than every baseline is called only below it."""
    members = [*FAMILIES[family(variant)], ALIGNED]
    line = [b for b in members if seed_values(cells, b, seeds, "ce")]
    ce = seed_values(cells, variant, seeds, "ce")
    points = [(mean_std(seed_values(cells, b, seeds, "ce"))[0], mean_std(seed_values(cells, b, seeds, m))[0])
              for b in line]
    front = pareto_front(points)
    out = {"variant": variant, "metric": m, "line": line, "family": family(variant), "seeds": len(ce),
           "line_seeds": [len(seed_values(cells, b, seeds, "ce")) for b in line],
           "front": [b for b, p in zip(line, points) if p in front],
           "ce_range": [front[0][0], front[-1][0]] if front else None}
    if not ce:
        return out | {"status": "no cells"}
    out["ce"], out["value"] = mean_std(ce)[0], mean_std(seed_values(cells, variant, seeds, m))[0]
    if len(line) < len(members):
        return out | {"status": f"no frontier: {len(line)} of its {len(members)} baselines "
                                f"({', '.join(members)}) have cells"}
    at = frontier_at(front, out["ce"])
    if at is None:
        return out | {"status": "no frontier"}
    out |= {"frontier": at, "gap": out["value"] - at}
    lower_ce = out["ce"] < front[0][0]   # a lower task loss than every baseline reached
    groups = {v: samples(cells, outcomes, v, seeds, ["ce", m]) for v in [variant, *line]}
    if any(g is None for g in groups.values()):
        return out | {"status": "no per-prompt data for the interval"}

    def gap(means):
        f = frontier_at(pareto_front([(means[b]["ce"], means[b][m]) for b in line]), means[variant]["ce"])
        return None if f is None else means[variant][m] - f

    boot = seed_prompt_bootstrap(groups, gap, draws=draws, seed=seed)
    out["bootstrap"] = boot
    if boot["undefined"] > UNDEFINED_SHARE * draws or boot["low"] is None:
        status = f"undecided: no frontier in {boot['undefined'] / draws:.0%} of bootstrap draws"
    elif boot["high"] < 0:
        status = "off the frontier (below)" + (": a lower CE and a lower share than every baseline" if lower_ce else "")
    elif lower_ce:
        status = "a lower CE than every baseline, not a lower share beyond the noise: no verdict"
    elif boot["low"] > 0:
        status = "off the frontier (above)"
    else:
        status = "on the frontier (interval covers 0)"
    return out | {"status": status}


def validation_error(cell: dict) -> float:
    """Validation ASR + validation over-refusal: both failure modes, so refusing everything cannot win."""
    return metric(cell, "asr_val") + metric(cell, "over_refusal_val")


def validation_difference(cells: dict, outcomes: dict, seeds: list[int], a: str, b: str, draws: int = DRAWS,
                          seed: int = 0) -> tuple[float, dict | None, dict | None, bool]:
    """Validation error (ASR + over-refusal) of ``a`` minus ``b`` -> (mean difference, Welch, bootstrap,
    whether ``a`` is lower beyond the noise: Welch's t <= -critical t and the bootstrap interval below 0)."""
    ea = [validation_error(cells[c]) for c in cell_names(cells, a, seeds)]
    eb = [validation_error(cells[c]) for c in cell_names(cells, b, seeds)]
    w = welch(ea, eb) if len(ea) > 1 and len(eb) > 1 else None
    metrics = ["asr_val", "over_refusal_val"]
    sa, sb = samples(cells, outcomes, a, seeds, metrics), samples(cells, outcomes, b, seeds, metrics)
    boot = None if sa is None or sb is None else seed_prompt_bootstrap(
        {a: sa, b: sb}, lambda means: sum(means[a][k] for k in metrics) - sum(means[b][k] for k in metrics),
        draws=draws, seed=seed)
    lower = (w is not None and w["t"] <= -w["t_crit"] and boot is not None and boot["high"] is not None
             and boot["high"] < 0)
    return mean_std(ea)[0] - mean_std(eb)[0], w, boot, lower


def choose_norm(cells: dict, outcomes: dict, seeds: list[int], draws: int = DRAWS, seed: int = 0) -> dict:
    """The default's norm: band (``BAND_VARIANT``) against l1 (``DEFAULT_VARIANT``), the same recipe
    otherwise. Band is taken unless l1's validation error is lower beyond the noise or band's mean test
    CE is over the slack above l1's: at the anchor band's gradient is zero by construction, while l1's
    is alpha * sign(rounding noise) * r, which clips the CE gradient away and makes runs differ with
    the world size. The rule was fixed before the band cells were run."""
    ce = {v: mean_std(seed_values(cells, v, seeds, "ce"))[0] for v in (BAND_VARIANT, DEFAULT_VARIANT)}
    out = {"band": BAND_VARIANT, "l1": DEFAULT_VARIANT, "ce": ce,
           "seeds": {v: len(cell_names(cells, v, seeds)) for v in (BAND_VARIANT, DEFAULT_VARIANT)}}
    if None in ce.values():
        return out | {"norm": None, "verdict": "a side has no cells: no choice yet"}
    diff, w, boot, l1_lower = validation_difference(cells, outcomes, seeds, DEFAULT_VARIANT, BAND_VARIANT, draws, seed)
    out |= {"l1_minus_band": diff, "welch": _rounded(w), "bootstrap": boot}
    if l1_lower:
        return out | {"norm": "l1", "verdict": "l1's validation error is lower beyond the noise: keep l1"}
    if ce[BAND_VARIANT] > ce[DEFAULT_VARIANT] * (1 + TASK_LOSS_SLACK):
        return out | {"norm": "l1", "verdict": f"band's test CE is over {TASK_LOSS_SLACK:.0%} above l1's: keep l1"}
    tested = "" if w is not None and boot is not None else " (one seed a side: no test of the noise yet)"
    side = f"{abs(diff):.1%} {'lower' if diff < 0 else 'higher'}"
    return out | {"norm": "band", "verdict": f"l1's validation error is {side} than band's, not lower beyond the "
                                             f"noise{tested}: band"}


def choose_on_validation(cells: dict, outcomes: dict, seeds: list[int], variants: list[str],
                         draws: int = DRAWS, seed: int = 0) -> dict | None:
    """The ProCon variant (sham controls excluded) with the lowest mean validation error among those
    whose mean test CE is within 5% of IFT's (CE is the task measure, not tuned on; only validation
    prompts choose). It replaces DEFAULT_VARIANT only when its error is lower by Welch's test
    (t <= -critical t at the Welch-Satterthwaite df) and the bootstrap interval lies below 0."""
    ift_ce = mean_std(seed_values(cells, "ift", seeds, "ce"))[0]
    if ift_ce is None:
        return None
    limit = ift_ce * (1 + TASK_LOSS_SLACK)
    errors = {v: [validation_error(cells[f"{v}_s{s}"]) for s in seeds if f"{v}_s{s}" in cells]
              for v in variants if v.startswith("procon") and "sham" not in v}
    eligible = [v for v, e in errors.items() if e and mean_std(seed_values(cells, v, seeds, "ce"))[0] <= limit]
    if not eligible:
        return {"chosen": None, "ce_limit": limit, "candidates": {v: len(e) for v, e in errors.items()}}
    best = min(eligible, key=lambda v: (mean_std(errors[v])[0], v != DEFAULT_VARIANT))   # a tie keeps the default
    out = {"chosen": best, "ce_limit": limit, "candidates": {v: len(e) for v, e in errors.items()},
           "error_val": mean_std(errors[best]), "default": DEFAULT_VARIANT,
           "asr": mean_std(seed_values(cells, best, seeds, "asr")),
           "over_refusal": mean_std(seed_values(cells, best, seeds, "over_refusal")), "welch": None,
           "bootstrap": None}
    if best == DEFAULT_VARIANT:
        return out | {"verdict": f"the default ({DEFAULT_VARIANT}) has the lowest validation error: keep it"}
    if not errors.get(DEFAULT_VARIANT):
        return out | {"verdict": f"the default ({DEFAULT_VARIANT}) has no cells: no comparison, no change"}
    diff, w, boot, lower = validation_difference(cells, outcomes, seeds, best, DEFAULT_VARIANT, draws, seed)
    out |= {"welch": _rounded(w), "bootstrap": boot}
    if lower:
        out["verdict"] = (f"{best}'s validation error is lower than the default {DEFAULT_VARIANT}'s by {-diff:.1%} "
                          "beyond the seed and prompt noise (Welch and bootstrap agree): make it the default")
    else:
        out["verdict"] = (f"{best}'s validation error is {-diff:.1%} lower than the default {DEFAULT_VARIANT}'s "
                          "on average, but not beyond the seed and prompt noise: keep the default")
    return out
