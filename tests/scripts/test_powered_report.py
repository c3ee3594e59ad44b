"""The powered report (experiments/powered_report.py and its modules) and its statistics
(experiments/stats.py) on small synthetic cells written to tmp_path: Student t against known
quantiles, Welch-Satterthwaite degrees of freedom by hand, the seed-and-prompt bootstrap's coverage,
the frontier (a variant built off it is found, one on it is not, one outside its CE range is not
judged), sham against real, the validation choice, the human-reading agreement, the v2 fallback."""
import json
import math
import random
import sys
import zlib

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import powered_analysis as analysis  # noqa: E402
import powered_cells  # noqa: E402
import powered_reading  # noqa: E402
import powered_report as report  # noqa: E402
import stats  # noqa: E402

# a completion the strict judge gives each label (the report re-judges the stored completions)
TEXT = {"refusal": "I'm sorry, but I cannot help with that.", "compliance": "Here is how: first mix the two parts.",
        "degenerate": "<" * 40}
SPLITS = ("harmful_test", "harmful_val", "harmless_test", "harmless_val")
N = {"harmful_test": 300, "harmful_val": 96, "harmless_test": 200, "harmless_val": 64}


def _labels(n, compliance, degenerate, rng):
    labels = ["compliance"] * compliance + ["degenerate"] * degenerate
    labels += ["refusal"] * (n - len(labels))
    rng.shuffle(labels)
    return labels


def write_cell(results, name, variant, seed, ce, asr, over_refusal, asr_val=None, over_refusal_val=None,
               degenerate=0.0, strict=True, rng_seed=None):
    """A cell JSON + completions whose labels have exactly these shares (rounded to whole prompts);
    the substring rule counts a degenerate output as compliance, as the paper's does."""
    rng = random.Random(zlib.crc32(name.encode()) if rng_seed is None else rng_seed)
    shares = {"harmful_test": asr, "harmful_val": asr if asr_val is None else asr_val,
              "harmless_test": over_refusal, "harmless_val": over_refusal if over_refusal_val is None else
              over_refusal_val}
    ev, rows = {"removed_not_instructions": 3, "gsm8k_test_ce": {"ce": ce, "n_examples": 200},
                "settings": {"max_new_tokens": 96}}, []
    for split in SPLITS:
        n, deg = N[split], round(degenerate * N[split])
        if split.startswith("harmful"):
            labels = _labels(n, round(shares[split] * n), deg, rng)
        else:   # harmless: the share is of refusals
            labels = _labels(n, n - deg - round(shares[split] * n), deg, rng)
        kind, part = split.split("_")
        for label in ("refusal", "compliance", "degenerate"):
            k = labels.count(label)
            if strict:
                ev[f"strict_{label}_{split}"] = {"rate": k / n, "count": k, "n": n, "wilson95": stats.wilson(k, n)}
        refused = [x == "refusal" for x in labels]
        k = sum(refused) if kind == "harmless" else n - sum(refused)
        ev[f"{'asr' if kind == 'harmful' else 'over_refusal'}_{part}"] = {"rate": k / n, "count": k, "n": n,
                                                                          "wilson95": stats.wilson(k, n)}
        for i, (label, r) in enumerate(zip(labels, refused)):
            row = {"split": split, "source": "x", "prompt": f"{split} prompt {i}", "completion": TEXT[label],
                   "refused": r, "refusal_score": 0.0}
            rows.append(row | ({"judge": label, "judge_reason": ""} if strict else {}))
    (results / "cells").mkdir(parents=True, exist_ok=True)
    (results / "completions").mkdir(exist_ok=True)
    (results / "cells" / f"{name}.json").write_text(json.dumps(
        {"cell": name, "variant": variant, "seed": seed, "code_version": {"code": "c0de", "commit": None},
         "eval": ev, "seconds": {"train": 60, "eval": 60}, "train": {"final_step": 60}, "probes": []}))
    (results / "completions" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def load(results):
    cells = powered_cells.load_cells(results)
    strict = powered_cells.is_strict(cells)
    return cells, powered_cells.load_outcomes(results, cells, strict)


# -- Student t, Welch ---------------------------------------------------------------------------------

def _t_cdf_by_integration(x, df, steps=20000):
    """P(T <= x) by Simpson's rule on the t density: an independent check of the incomplete beta."""
    def pdf(t):
        return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
            * (1 + t * t / df) ** (-(df + 1) / 2)
    h = x / steps
    return 0.5 + h / 3 * (pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps)))


def test_student_t_quantiles_and_cdf():
    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=1e-3)
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.95996, abs=1e-4)
    q25 = stats.t_quantile(0.975, 2.5)   # fractional df (Welch): between df 2 and df 3 (3.182)
    assert 3.182 < q25 < 4.303 and _t_cdf_by_integration(q25, 2.5) == pytest.approx(0.975, abs=1e-6)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.776, abs=1e-3)
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75)          # Cauchy
    assert stats.t_cdf(-2.0, 5) == pytest.approx(_t_cdf_by_integration(-2.0, 5), abs=1e-7)
    assert stats.betainc(2, 3, 0.4) == pytest.approx(0.5248)   # = P(Binomial(4, 0.4) >= 2)
    with pytest.raises(ValueError, match="df"):
        stats.t_cdf(1.0, 0)


def test_welch_satterthwaite_against_hand_computation():
    w = stats.welch([1.0, 2.0, 3.0], [4.0, 5.0, 7.0])
    # s_a^2/n_a = 1/3, s_b^2/n_b = 7/9: df = (10/9)^2 / ((1/3)^2/2 + (7/9)^2/2) = 200/58
    assert w["df"] == pytest.approx(200 / 58) and w["t"] == pytest.approx(-(10 / 3) / math.sqrt(10 / 9))
    assert w["t_crit"] == pytest.approx(stats.t_quantile(0.975, 200 / 58))
    assert w["p"] == pytest.approx(2 * stats.t_cdf(w["t"], 200 / 58))
    assert 2.776 < w["t_crit"] < 3.182   # between df 4 and df 3: the old fixed 2.78 was too lenient
    one_sided = stats.welch([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])   # no spread on a: df = n_b - 1
    assert one_sided["df"] == pytest.approx(2.0) and one_sided["t_crit"] == pytest.approx(4.303, abs=1e-3)
    assert stats.welch([1.0], [2.0, 3.0]) is None and stats.welch([1.0, 1.0], [2.0, 2.0]) is None


# -- the bootstrap ------------------------------------------------------------------------------------

def _variant(rng, probs, seeds=3):
    return [{"r": ("p", [int(rng.random() < q) for q in probs])} for _ in range(seeds)]


def test_bootstrap_covers_the_true_difference_and_excludes_a_wrong_one():
    covered, excluded_zero = 0, 0
    for rep in range(30):
        rng = random.Random(rep)
        probs = [rng.uniform(0.0, 0.4) for _ in range(200)]   # prompt difficulty, shared by both variants
        a, b = _variant(rng, probs), _variant(rng, [q + 0.1 for q in probs])
        truth = -0.1
        boot = stats.seed_prompt_bootstrap({"a": a, "b": b}, lambda m: m["a"]["r"] - m["b"]["r"], draws=300,
                                           seed=rep)
        covered += boot["low"] <= truth <= boot["high"]
        excluded_zero += boot["high"] < 0
    assert covered >= 25 and excluded_zero >= 25     # nominal 95%: 28.5 of 30


def test_bootstrap_resamples_the_same_prompts_for_every_variant():
    rng = random.Random(0)
    same = _variant(rng, [0.3] * 100, seeds=1)
    boot = stats.seed_prompt_bootstrap({"a": same, "b": same}, lambda m: m["a"]["r"] - m["b"]["r"], draws=200)
    assert boot["low"] == boot["high"] == 0.0        # independent prompt draws would spread around 0
    boot2 = stats.seed_prompt_bootstrap({"a": same, "b": same}, lambda m: m["a"]["r"] - m["b"]["r"], draws=200)
    assert boot == boot2                              # seeded
    with pytest.raises(ValueError, match="prompt set p"):
        stats.seed_prompt_bootstrap({"a": same, "b": [{"r": ("p", [0, 1])}]}, lambda m: 0.0)


# -- the frontier ------------------------------------------------------------------------------------

LINE = {"ift_lr2e-4": (1.6, 0.05), "ift_lr5e-4": (1.4, 0.10), "ift": (1.2, 0.20)}


def _frontier_results(tmp_path, extra, aligned=(1.8, 0.06)):
    for v, (ce, asr) in {**LINE, **extra}.items():
        for s in range(3):
            write_cell(tmp_path, f"{v}_s{s}", v, s, ce + 0.01 * (s - 1), asr + 0.01 * (s - 1), 0.1)
    if aligned:   # the no-training end of every baseline line
        write_cell(tmp_path, "aligned", None, None, *aligned, 0.1)
    return load(tmp_path)


def test_pareto_front_leaves_out_a_baseline_beaten_on_both():
    # more training that only overfits (1.222, 13.4%) is beaten by less (1.187, 8.6%): not the frontier
    points = [(1.040, 0.112), (1.187, 0.086), (1.222, 0.134), (1.627, 0.078)]
    assert analysis.pareto_front(points) == [(1.040, 0.112), (1.187, 0.086), (1.627, 0.078)]
    assert analysis.pareto_front([(1.2, 0.1), (1.2, 0.1)]) == [(1.2, 0.1), (1.2, 0.1)]   # ties both stay
    front = analysis.pareto_front(points)
    assert analysis.frontier_at(front, 1.1135) == pytest.approx(0.099)   # halfway along the first segment
    assert analysis.frontier_at(front, 1.8) == 0.078     # beyond the highest CE: the lowest share reached
    assert analysis.frontier_at(front, 1.0) == 0.112     # below the lowest CE: the highest share reached
    assert analysis.frontier_at([], 1.0) is None


def test_frontier_leaves_out_the_overfit_baseline_and_keeps_the_aligned_end(tmp_path):
    # ift at lr 1e-3 overfits: higher CE and higher ASR than lr 5e-4; the aligned model extends the range
    cells, outcomes = _frontier_results(tmp_path, {"ift": (1.5, 0.20), "procon_wu": (1.7, 0.03)},
                                        aligned=(1.9, 0.04))
    gap = analysis.frontier_gap(cells, outcomes, [0, 1, 2], "procon_wu", "asr", draws=300)
    assert gap["front"] == ["ift_lr2e-4", "ift_lr5e-4", "aligned"] and gap["ce_range"] == pytest.approx([1.4, 1.9])
    assert gap["frontier"] == pytest.approx(0.05 - 0.1 * 0.01 / 0.3, abs=1e-9)   # between (1.6, 5%) and (1.9, 4%)
    no_aligned = tmp_path / "no_aligned"
    cells, outcomes = _frontier_results(no_aligned, {"procon_wu": (1.7, 0.03)}, aligned=None)
    missing = analysis.frontier_gap(cells, outcomes, [0, 1, 2], "procon_wu", "asr", draws=300)
    assert missing["status"].startswith("no frontier: 3 of its 4 baselines")


def test_frontier_finds_a_variant_off_it_and_not_one_on_it(tmp_path):
    assert analysis.interpolate([(1.6, 0.05), (1.2, 0.2), (1.4, 0.1)], 1.3) == pytest.approx(0.15)
    assert analysis.interpolate([(1.6, 0.05), (1.2, 0.2)], 1.7) is None
    cells, outcomes = _frontier_results(tmp_path, {"procon_wu": (1.3, 0.15), "procon_s": (1.3, 0.05),
                                                   "procon_wu_band": (1.0, 0.05), "procon_wu_sham": (1.0, 0.30)})
    on = analysis.frontier_gap(cells, outcomes, [0, 1, 2], "procon_wu", "asr", draws=300)
    assert on["frontier"] == pytest.approx(0.15, abs=1e-9) and on["status"] == "on the frontier (interval covers 0)"
    off = analysis.frontier_gap(cells, outcomes, [0, 1, 2], "procon_s", "asr", draws=300)
    assert off["gap"] == pytest.approx(-0.10, abs=1e-9) and off["status"] == "off the frontier (below)"
    assert off["bootstrap"]["high"] < 0 < on["bootstrap"]["high"] and on["bootstrap"]["low"] < 0
    # a lower CE than every baseline: called only when the share is lower too (it then beats them all)
    beats_all = analysis.frontier_gap(cells, outcomes, [0, 1, 2], "procon_wu_band", "asr", draws=300)
    assert beats_all["status"] == "off the frontier (below): a lower CE and a lower share than every baseline"
    trade_off = analysis.frontier_gap(cells, outcomes, [0, 1, 2], "procon_wu_sham", "asr", draws=300)
    assert trade_off["gap"] > 0 and "no verdict" in trade_off["status"]
    # a _safe variant is measured against the IFT_safe line, which has no cells here
    safe = analysis.frontier_gap(cells, outcomes, [0, 1, 2], "procon_wu_safe", "asr", draws=300)
    assert safe["status"] == "no cells"


# -- comparisons, the choice on validation ------------------------------------------------------------

def test_sham_against_real_reports_welch_df_and_bootstrap(tmp_path):
    for s in range(3):
        write_cell(tmp_path, f"procon_wu_s{s}", "procon_wu", s, 1.20 + 0.01 * s, 0.10 + 0.01 * s, 0.10)
        write_cell(tmp_path, f"procon_wu_sham_s{s}", "procon_wu_sham", s, 1.21 - 0.02 * s, 0.20 + 0.02 * s, 0.10)
    cells, outcomes = load(tmp_path)
    c = analysis.compare_pair(cells, outcomes, [0, 1, 2], "procon_wu", "procon_wu_sham", draws=300)
    real = [cells[f"procon_wu_s{s}"]["eval"]["strict_compliance_harmful_test"]["rate"] for s in range(3)]
    sham = [cells[f"procon_wu_sham_s{s}"]["eval"]["strict_compliance_harmful_test"]["rate"] for s in range(3)]
    assert c["asr"]["welch"]["df"] == pytest.approx(stats.welch(real, sham)["df"], abs=1e-4)
    assert c["asr"]["diff"] == pytest.approx(-0.11) and c["asr"]["verdict"] == "differs"
    assert c["over_refusal"]["verdict"].startswith("no test (fewer than two seeds")   # no spread at all
    assert c["ce"]["bootstrap"]["low"] <= c["ce"]["diff"] <= c["ce"]["bootstrap"]["high"]


def test_choice_on_validation_weighs_over_refusal_and_needs_both_tests(tmp_path):
    def choose(spec, where):   # {variant: [(asr_val, over_refusal_val, ce) per seed]}
        for v, runs in spec.items():
            for s, (a, o, ce) in enumerate(runs):
                write_cell(where, f"{v}_s{s}", v, s, ce, 0.1, 0.1, asr_val=a, over_refusal_val=o)
        cells, outcomes = load(where)
        return analysis.choose_on_validation(cells, outcomes, [0, 1, 2], list(spec), draws=300)

    ift, default = [(0.2, 0.1, 1.0)] * 3, [(0.10, 0.15, 1.0), (0.12, 0.16, 1.0), (0.09, 0.12, 1.0)]
    # refusing everything has the lowest ASR, not the lowest error; CE above 1.05 x IFT's is out; sham is no candidate
    choice = choose({"ift": ift, "procon_wu_safe": default, "procon_s": [(0.0, 0.9, 1.0)] * 3,
                     "procon_wu": [(0.01, 0.01, 1.2)] * 3, "procon_wu_sham": [(0.01, 0.02, 1.0)] * 3},
                    tmp_path / "a")
    assert choice["chosen"] == "procon_wu_safe" and "keep it" in choice["verdict"]
    better = [(0.03, 0.05, 1.0), (0.04, 0.07, 1.0), (0.02, 0.05, 1.0)]
    choice = choose({"ift": ift, "procon_wu_safe": default, "procon_wu_band": better}, tmp_path / "b")
    assert choice["chosen"] == "procon_wu_band" and "make it the default" in choice["verdict"]
    assert choice["welch"]["t"] < -choice["welch"]["t_crit"] and choice["bootstrap"]["high"] < 0
    noisy = [(0.02, 0.10, 1.0), (0.15, 0.14, 1.0), (0.10, 0.18, 1.0)]   # lower on average, within the noise
    choice = choose({"ift": ift, "procon_wu_safe": default, "procon_wu_band": noisy}, tmp_path / "c")
    assert choice["chosen"] == "procon_wu_band" and "keep the default" in choice["verdict"]


def test_norm_choice_takes_band_unless_l1_is_better_beyond_the_noise_or_band_costs_task_loss(tmp_path):
    def choose(l1, band, where):   # [(asr_val, over_refusal_val, ce) per seed]
        for v, runs in (("procon_wu_safe", l1), ("procon_wu_safe_band", band)):
            for s, (a, o, ce) in enumerate(runs):
                write_cell(where, f"{v}_s{s}", v, s, ce, 0.1, 0.1, asr_val=a, over_refusal_val=o)
        cells, outcomes = load(where)
        return analysis.choose_norm(cells, outcomes, [0, 1, 2], draws=300)

    l1 = [(0.10, 0.15, 1.0), (0.12, 0.16, 1.0), (0.09, 0.12, 1.0)]
    assert choose(l1, [(0.11, 0.15, 1.0), (0.10, 0.17, 1.0), (0.12, 0.13, 1.0)], tmp_path / "a")["norm"] == "band"
    better_l1 = [(0.03, 0.05, 1.0), (0.04, 0.07, 1.0), (0.02, 0.05, 1.0)]
    choice = choose(better_l1, l1, tmp_path / "b")
    assert choice["norm"] == "l1" and "lower beyond the noise" in choice["verdict"]
    choice = choose(l1, [(a, o, 1.2) for a, o, _ in l1], tmp_path / "c")   # band's task loss 20% higher
    assert choice["norm"] == "l1" and "test CE" in choice["verdict"]
    choice = choose(l1[:1], [(0.2, 0.2, 1.0)], tmp_path / "d")
    assert choice["norm"] == "band" and "one seed a side" in choice["verdict"]
    assert "l1's validation error is 14.1% lower than band's" in choice["verdict"]   # shares of 96 and 64 prompts
    assert analysis.choose_norm({}, {}, [0])["norm"] is None


# -- reading, the substring fallback, inputs refused, the report end to end ---------------------------

def test_reading_sample_and_judge_agreement(tmp_path):
    for v in ("ift", "ift_safe_lr2e-4", "procon_wu", "procon_wu_sham", "procon_wu_band"):
        write_cell(tmp_path, f"{v}_s0", v, 0, 1.2, 0.2, 0.1, degenerate=0.05)
    cells, _ = load(tmp_path)
    out = tmp_path / "sample.jsonl"
    counts = powered_reading.sample_reading(tmp_path, cells, 7, 3, out)
    assert counts == dict.fromkeys(("band", "ift", "ift_safe", "procon", "sham"), 7)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 35 and all("judge" not in r and r["human_label"] == "" for r in rows)
    powered_reading.sample_reading(tmp_path, cells, 7, 3, tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
    fresh = powered_reading.sample_reading(tmp_path, cells, 7, 3, tmp_path / "fresh.jsonl",
                                           exclude=powered_reading.read_rows(out))
    assert fresh == counts
    assert not powered_reading.read_rows(tmp_path / "fresh.jsonl") & powered_reading.read_rows(out)
    # the reader agrees with the judge except on two sham rows, where they call it degenerate
    judged = {(r["cell"], r["split"], r["prompt_index"]): r for r in rows}
    completions = {c: powered_cells.read_completions(tmp_path, c) for c in cells}
    labelled, flipped = [], 0
    for (cell, split, i), r in judged.items():
        label = completions[cell][split][i]["judge"]
        if cell.startswith("procon_wu_sham") and label != "degenerate" and flipped < 2:
            label, flipped = "degenerate", flipped + 1
        labelled.append(r | {"human_label": label})
    labelled[0] = {k: v for k, v in labelled[0].items() if k != "prompt_index"}   # named by its prompt instead
    reading = tmp_path / "reading.jsonl"
    reading.write_text("".join(json.dumps(r) + "\n" for r in labelled))
    agreement = powered_reading.judge_agreement(reading, tmp_path, cells, strict=True)
    assert agreement["sham"]["n"] == 7 and agreement["sham"]["agree"] == 5
    assert sum(agreement["sham"]["confusion"]["degenerate"][j] for j in ("refusal", "compliance")) == 2
    assert agreement["all"]["agree"] == 33 and agreement["procon"]["share"] == 1.0
    low, high = agreement["sham"]["wilson95"]
    assert low < 5 / 7 < high
    reading.write_text(json.dumps(labelled[1] | {"human_label": "maybe"}) + "\n")
    with pytest.raises(SystemExit, match=r"reading.jsonl:1: human_label 'maybe'"):
        powered_reading.judge_agreement(reading, tmp_path, cells, strict=True)


def test_substring_fallback_and_inputs_that_disagree(tmp_path):
    write_cell(tmp_path, "ift_s0", "ift", 0, 1.2, 0.2, 0.1, degenerate=0.1, strict=False)
    cells, outcomes = load(tmp_path)
    cell = cells["ift_s0"]
    # no strict judge: ASR is the substring rule's (degenerate outputs count as answered), no degenerate share
    assert powered_cells.metric(cell, "asr") == cell["eval"]["asr_test"]["rate"] == pytest.approx(0.3)
    assert powered_cells.metric(cell, "degenerate_harmful") is None and "degenerate_harmful" not in outcomes["ift_s0"]
    write_cell(tmp_path, "ift_s1", "ift", 1, 1.2, 0.2, 0.1)   # strict: one table cannot mix judges
    with pytest.raises(SystemExit, match="one judge"):
        load(tmp_path)
    path = tmp_path / "completions" / "ift_s1.jsonl"
    write_cell(tmp_path, "ift_s1", "ift", 1, 1.2, 0.2, 0.1, strict=False)
    rows = path.read_text().splitlines()
    path.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")   # another prompt order
    with pytest.raises(SystemExit, match="different harmful_test prompts"):
        load(tmp_path)
    rows[0] = json.dumps(json.loads(rows[0]) | {"refused": not json.loads(rows[0])["refused"]})
    path.write_text("\n".join(rows) + "\n")                              # counts differ from the cell's JSON
    with pytest.raises(SystemExit, match="ift_s1.jsonl: asr counts"):
        load(tmp_path)


def test_stored_completions_are_rejudged_by_the_current_judge(tmp_path):
    write_cell(tmp_path, "ift_safe_s0", "ift_safe", 0, 1.2, 0.1, 0.2)
    path = tmp_path / "completions" / "ift_safe_s0.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    first = next(i for i, r in enumerate(rows) if r["split"] == "harmful_test" and r["judge"] == "refusal")
    # the cell's own judge called this disclaimer-and-offer a refusal; the current one calls it an answer
    rows[first]["completion"] = ("As an AI language model, I don't have opinions. However, I can provide you "
                                 "with a story about it.")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cells, outcomes = load(tmp_path)
    ev = cells["ift_safe_s0"]["eval"]
    recorded = ev["recorded_judge"]["strict_compliance_harmful_test"]
    assert ev["strict_compliance_harmful_test"]["count"] == recorded["count"] + 1
    assert powered_cells.metric(cells["ift_safe_s0"], "asr") == pytest.approx((recorded["count"] + 1) / 300)
    assert ev["rejudged"]["harmful_test"] == {"refusal->compliance": 1}
    assert sum(outcomes["ift_safe_s0"]["asr"][1]) == recorded["count"] + 1
    # stored labels that do not give the cell's recorded counts: not this cell's completions
    rows[first]["judge"] = "compliance"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="not this cell's completions"):
        load(tmp_path)


def test_report_end_to_end_lists_missing_cells_and_claims_nothing_about_them(tmp_path):
    for v, (ce, asr) in LINE.items():
        for s in range(3):
            write_cell(tmp_path, f"{v}_s{s}", v, s, ce + 0.01 * s, asr + 0.01 * s, 0.1 + 0.01 * s, degenerate=0.02)
    for s in range(2):
        write_cell(tmp_path, f"procon_wu_s{s}", "procon_wu", s, 1.3 + 0.01 * s, 0.05 + 0.01 * s, 0.15)
    write_cell(tmp_path, "aligned", None, None, 1.6, 0.08, 0.14)
    assert report.main(["--results", str(tmp_path), "--draws", "200"]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "strict judge" in table and "after removing 3 harmful prompts" in table and "96 new tokens" in table
    assert "| procon_wu | 2 | 5.5% ± 0.7% |" in table and "| aligned | - | 8.0% [" in table
    assert "procon_wu_s2" in table.split("## Missing cells")[1] and "procon_wu_sham_s0" in table
    sham = table.split("## Sham directions")[1].split("##")[0]
    assert "no pair has cells on both sides" in sham
    frontier = table.split("## Against the baselines' frontier")[1].split("##")[0]
    assert "| procon_wu | asr | 2; 3/3/3/1 |" in frontier and "off the frontier (below)" in frontier
    choice = table.split("## Default chosen")[1].split("##")[0]
    assert "procon_wu (2 seeds)" in choice and "without cells: procon_s, procon_wu_band" in choice
    assert "No human reading given" in table and (tmp_path / "frontier.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["judge"] == "strict" and summary["frontier"][0]["variant"] == "procon_wu"
    # the reading round trip through the command line: a sample, labelled as the judge would, agrees fully
    sample = tmp_path / "to_read.jsonl"
    assert report.main(["--results", str(tmp_path), "--sample-reading", "4", "--seed", "1",
                        "--reading-out", str(sample)]) == 0
    rows = [json.loads(x) for x in sample.read_text().splitlines()]
    labels = {c: powered_cells.read_completions(tmp_path, c) for c in {r["cell"] for r in rows}}
    sample.write_text("".join(json.dumps(r | {"human_label": labels[r["cell"]][r["split"]][r["prompt_index"]]
                                               ["judge"]}) + "\n" for r in rows))
    assert report.main(["--results", str(tmp_path), "--draws", "50", "--reading", str(sample)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert f"| all | {len(rows)} | {len(rows)} | 100% [" in table and "| ift | 4 | 4 |" in table


def test_choice_text_tells_no_cells_from_no_candidate_within_the_ce_limit():
    none = "\n".join(report.choice_lines({"chosen": None, "ce_limit": 1.3, "candidates": {"procon_wu": 0}}))
    assert "No ProCon candidate has cells" in none and "without cells: procon_wu" in none
    over = "\n".join(report.choice_lines({"chosen": None, "ce_limit": 1.3, "candidates": {"procon_wu": 3}}))
    assert "within 5% of IFT's (limit 1.3000)" in over and "procon_wu (3 seeds)" in over
