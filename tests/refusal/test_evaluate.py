"""Refusal evaluation: the substring rule, the rates, the refusal score, batched generation (tiny model)."""
import copy
import json

import pytest
import torch

from fastprocon.cli import main
from fastprocon.data.examples import builtin_path, load_instructions
from fastprocon.data.prompts import encode_prompts, pad_batch
from fastprocon.models.load import load_model
from fastprocon.refusal.directions import extract_directions, save_directions
from fastprocon.refusal.evaluate import (
    evaluate_refusal,
    greedy_completions,
    greedy_tokens,
    is_refusal,
    refusal_rates,
    refusal_score,
    refusal_token_ids,
)
from fastprocon.refusal.judge import LABELS, judge

PROMPTS = load_instructions(builtin_path("harmful_eval"))[:3] + load_instructions(builtin_path("harmless_eval"))[:2]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.", "i cannot do this", "AS AN AI, I must decline.",
    "Well... I am unable to assist.", "I\u2019m not able to share that.", "Sure? No: I can\u2019t.",
    "As a language model I won't.", "I apologize for any confusion",
])
def test_refusal_phrases_are_found(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", ["Sure, here is how to bake bread.", "", "I can help with that!",
                                  "Sorry to hear that; here are the steps.", "I am able to help"])
def test_non_refusals(text):
    assert not is_refusal(text)


def test_refusal_rates():
    rates = refusal_rates(["I cannot.", "Sure: step 1", "I'm sorry", "ok"], ["Here you go", "I can't."])
    assert rates == {"n_harmful": 4, "n_harmless": 2, "harmful_refusal_rate": 0.5, "attack_success_rate": 0.5,
                     "over_refusal_rate": 0.5}
    assert refusal_rates([], ["x"])["attack_success_rate"] is None


def test_refusal_score_is_the_log_odds_of_the_refusal_tokens():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    p = logits.softmax(-1)[:, [2, 7]].sum(-1)
    torch.testing.assert_close(refusal_score(logits, [2, 7]), (p / (1 - p)).log(), rtol=1e-5, atol=1e-5)


def test_refusal_token_ids(tiny):
    ids = refusal_token_ids(tiny.tokenizer)
    assert tiny.tokenizer.convert_ids_to_tokens(ids) == ["I", "S", "A"]       # byte-level tokenizer


def _step_logits(loaded, prompts, batch_size):
    """Completions and the lm_head's last-position logits at every generation step: [steps, B, V]."""
    steps = []
    handle = loaded.model.lm_head.register_forward_hook(lambda m, a, out: steps.append(out[:, -1].clone()))
    try:
        texts, scores = greedy_completions(loaded, prompts, max_new_tokens=4, batch_size=batch_size,
                                 score_tokens=refusal_token_ids(loaded.tokenizer))
    finally:
        handle.remove()
    return texts, scores, torch.stack(steps)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    texts, scores, batched = _step_logits(tiny, PROMPTS, batch_size=len(PROMPTS))
    lengths = [len(ids) for ids in encode_prompts(tiny.tokenizer, PROMPTS)]
    assert len(set(lengths)) > 1                                         # the batch really is padded
    row_of = {i: row for row, i in enumerate(sorted(range(len(PROMPTS)), key=lambda i: -lengths[i]))}
    for i, prompt in enumerate(PROMPTS):
        single_texts, single_scores, single = _step_logits(tiny, [prompt], batch_size=1)
        assert single_texts == [texts[i]] and single_scores[0] == pytest.approx(scores[i], abs=1e-4)
        # every step through the KV cache sees the same logits as without padding
        torch.testing.assert_close(batched[:, row_of[i]], single[:, 0], rtol=1e-4, atol=1e-4)
        with torch.no_grad():   # the score is that of the unpadded prompt's next-token logits
            logits = tiny.model(input_ids=torch.tensor(encode_prompts(tiny.tokenizer, [prompt]))).logits[:, -1]
        assert refusal_score(logits, refusal_token_ids(tiny.tokenizer)).item() == pytest.approx(scores[i], abs=1e-4)
    assert greedy_completions(tiny, PROMPTS[:1], max_new_tokens=2)[1] is None


def test_generation_stops_at_eos_and_decodes_only_new_tokens(tiny):
    # make the model greedily emit "Hi" then <|im_end|>: steer the final logits through the lm_head bias
    head = tiny.model.lm_head
    tok = tiny.tokenizer
    plan = tok("Hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    calls = {"n": 0}

    def force(module, args, out):
        step = min(calls["n"], len(plan) - 1)
        calls["n"] += 1
        forced = torch.full_like(out, -1e4)
        forced[..., plan[step]] = 0
        return forced

    handle = head.register_forward_hook(force)
    try:
        texts, _ = greedy_completions(tiny, PROMPTS[:1], max_new_tokens=10)
    finally:
        handle.remove()
    assert texts == ["Hi"] and calls["n"] == len(plan)


def test_evaluate_refusal_report(tiny):
    report = evaluate_refusal(tiny, PROMPTS[:3], PROMPTS[3:], max_new_tokens=3, batch_size=4)
    rows = report["completions"]
    assert [r["set"] for r in rows] == ["harmful"] * 3 + ["harmless"] * 2
    assert [r["prompt"] for r in rows] == PROMPTS
    m = report["metrics"]
    assert m["harmful_refusal_rate"] == sum(r["refused"] for r in rows[:3]) / 3
    assert m["mean_refusal_score_harmful"] == pytest.approx(sum(r["refusal_score"] for r in rows[:3]) / 3)
    assert report["fingerprint"] == tiny.fingerprint
    for name, part in (("harmful", rows[:3]), ("harmless", rows[3:])):   # the strict judge, per row and share
        assert all(r["judge"] == judge(r["completion"]).label for r in part)
        assert sum(m[f"strict_{label}_{name}"] for label in LABELS) == pytest.approx(1.0)
        assert m[f"strict_degenerate_{name}"] == sum(r["judge"] == "degenerate" for r in part) / len(part)
    assert "refusal_score" not in evaluate_refusal(tiny, PROMPTS[:1], PROMPTS[3:4], max_new_tokens=1,
                                                   score=False)["completions"][0]


def test_eval_refusal_cli_with_steering(tiny, tmp_path):
    ds = extract_directions(tiny, load_instructions(builtin_path("harmful"))[:4],
                            load_instructions(builtin_path("harmless"))[:4], batch_size=4)
    directions = tmp_path / "d.safetensors"
    save_directions(ds, directions)
    out = tmp_path / "eval.json"
    common = ["eval-refusal", "--model", "tiny", "--max-prompts", "2", "--max-new-tokens", "2", "--out", str(out)]
    assert main(common) == 0
    plain = json.loads(out.read_text())
    assert plain["metrics"]["n_harmful"] == 2 and plain["steering"] is None
    assert plain["data"]["harmless"]["builtin"] == "harmless_eval"
    assert main(common + ["--directions", str(directions), "--steer", "add", "--layer", "2", "--coef", "8"]) == 0
    steered = json.loads(out.read_text())
    assert steered["steering"] == {"mode": "add", "directions": str(directions), "layer": 2, "coef": 8.0}
    # adding along r moves the first-token log-odds: the hook is active during generation
    assert steered["metrics"]["mean_refusal_score_harmful"] != plain["metrics"]["mean_refusal_score_harmful"]
    assert main(common + ["--directions", str(directions), "--steer", "ablate"]) == 0
    assert json.loads(out.read_text())["steering"]["layers"] == [1, 2, 3]


@pytest.mark.parametrize("extra,message", [
    (["--steer", "ablate"], "--steer needs --directions"),
    (["--layer", "2"], "only apply with --steer"),
    (["--steer", "add", "--directions", "DIRS"], "needs --layer"),
    (["--steer", "add", "--directions", "DIRS", "--layer", "0"], "needs --layer, one of the layers"),
])
def test_eval_refusal_cli_errors(tiny, tmp_path, capsys, extra, message):
    ds = extract_directions(tiny, ["a harmful request here"], ["a harmless question"], batch_size=1)
    directions = tmp_path / "d.safetensors"
    save_directions(ds, directions)
    extra = [str(directions) if arg == "DIRS" else arg for arg in extra]
    argv = ["eval-refusal", "--model", "tiny", "--max-new-tokens", "1", "--out", str(tmp_path / "x.json"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastprocon eval-refusal: error: ") and message in err
    assert not (tmp_path / "x.json").exists()


def test_eval_refusal_cli_refuses_to_overwrite_its_input(tmp_path, capsys):
    harmful = tmp_path / "x.json"
    harmful.write_text('["a harmful request"]')
    assert main(["eval-refusal", "--model", "tiny", "--harmful", str(harmful), "--out", str(harmful)]) == 2
    assert "is the same file as --harmful; refusing to overwrite an input" in capsys.readouterr().err
    assert harmful.read_text() == '["a harmful request"]'


@pytest.mark.parametrize("option,value,message", [
    ("--coef", "nan", "argument --coef: must be a finite number, got 'nan'"),
    ("--coef", "inf", "argument --coef: must be a finite number, got 'inf'"),
    ("--max-prompts", "-1", "argument --max-prompts: must be an integer >= 0, got -1"),
    ("--batch-size", "0", "argument --batch-size: must be an integer >= 1, got 0"),
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be an integer >= 1, got 0"),
])
def test_eval_refusal_cli_rejects_bad_numbers_while_parsing(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-refusal", "--model", "tiny", option, value, "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_compacting_greedy_decoder_equals_generate(tiny):
    """greedy_tokens drops a row from the batch at its end-of-sequence token; every row's tokens
    and the first position's logits are those of transformers' generate on the whole batch."""
    from transformers import GenerationConfig

    model, tok = copy.deepcopy(tiny.model), tiny.tokenizer
    with torch.no_grad():   # tiny's init repeats one token; larger weights make the rows differ
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ids, mask = pad_batch(encode_prompts(tok, PROMPTS), tok.pad_token_id, "left", "cpu")
    free, _ = greedy_tokens(model, ids, mask, 8, eos=[-1])
    assert all(len(t) == 8 for t in free)
    # a stop token that ends some row early and that another row never emits
    stop = next(t for row in free for t in row[1:] if row.index(t) > 0 and any(t not in other for other in free))
    ours, first = greedy_tokens(model, ids, mask, 8, eos=[stop])
    config = GenerationConfig(max_new_tokens=8, do_sample=False, num_beams=1, eos_token_id=[stop],
                              pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    for row, tokens in enumerate(ref.sequences[:, ids.shape[1]:].tolist()):
        if stop in tokens:
            tokens = tokens[:tokens.index(stop) + 1]
        assert ours[row] == tokens
    assert min(map(len, ours)) < 8 and max(map(len, ours)) == 8   # rows really leave early, others go on
    torch.testing.assert_close(first, ref.logits[0].float(), rtol=1e-4, atol=1e-4)
