"""The tools refuse what would be silently wrong (tiny model): writing over a training run's
directions or reference cache without --force, a stale quality report beside new directions,
prompts longer than the model's context; and the penalty's weight-0 tokens and D = 0."""
import json

import pytest
import torch

from fastprocon import anchor_projection, procon_penalty
from fastprocon.cli import main
from fastprocon.data.examples import builtin_path, load_instructions
from fastprocon.data.prompts import encode_prompts
from fastprocon.models.load import load_model
from fastprocon.refusal.directions import extract_directions, prompt_states, save_directions
from fastprocon.refusal.evaluate import greedy_completions
from fastprocon.utils.io import check_output

HARMFUL = load_instructions(builtin_path("harmful"))[:4]
HARMLESS = load_instructions(builtin_path("harmless"))[:4]
LONG = "please " * 2100    # > 2048 tokens of the tiny model's byte-level tokenizer and context


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture
def run_dir(tiny, tmp_path):
    """A directory that looks like a training run's, with its directions and reference cache."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("[train]\n")
    save_directions(extract_directions(tiny, HARMFUL, HARMLESS, batch_size=4), run / "directions.safetensors")
    (run / "reference.safetensors").write_bytes(b"z0 of the run")
    return run


def test_directions_will_not_replace_a_runs_directions_without_force(run_dir, capsys):
    before = (run_dir / "directions.safetensors").read_bytes()
    argv = ["directions", "--model", "tiny", "--max-prompts", "2", "--no-quality", "--out", str(run_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastprocon directions: error: --out {run_dir}: {run_dir / 'directions.safetensors'} "
                          f"exists and belongs to the training run in {run_dir}") and "--force" in err
    assert (run_dir / "directions.safetensors").read_bytes() == before
    assert main([*argv, "--force"]) == 0
    assert (run_dir / "directions.safetensors").read_bytes() != before


def test_reference_will_not_replace_a_runs_cache_without_force(run_dir, capsys):
    out = run_dir / "reference.safetensors"
    assert main(["reference", "--model", "tiny", "--directions", str(run_dir / "directions.safetensors"),
                 "--data", "benign", "--max-length", "64", "--out", str(out)]) == 2
    assert f"{out} exists and belongs to the training run in {run_dir}" in capsys.readouterr().err
    assert out.read_bytes() == b"z0 of the run"
    assert check_output(out, force=True) == out             # --force lets it through
    assert check_output(run_dir / "new.safetensors", force=False)   # a new file in a run dir is fine


def test_new_directions_never_sit_beside_an_older_quality_report(tmp_path):
    out = tmp_path / "dirs"
    out.mkdir()
    (out / "quality.json").write_text(json.dumps({"best_layer": 99}))
    (out / "quality.png").write_bytes(b"old plot")
    assert main(["directions", "--model", "tiny", "--max-prompts", "2", "--no-quality", "--out", str(out)]) == 0
    assert (out / "directions.safetensors").is_file()
    assert not (out / "quality.json").exists() and not (out / "quality.png").exists()


def test_a_prompt_longer_than_the_context_is_an_error_naming_it(tiny):
    with pytest.raises(ValueError, match=r"prompt 1 \('please please .*'\.\.\.\) is \d+ tokens with the chat "
                                         r"template, more than the 2048 of the model's context"):
        next(prompt_states(tiny, ["hello", LONG]))
    overhead = len(encode_prompts(tiny.tokenizer, ["x"])[0]) - 1      # the chat template's tokens
    fits_but_no_room = "y" * (2044 - overhead)                          # 2044 tokens: 2048 - 8 < 2044 <= 2048
    next(prompt_states(tiny, [fits_but_no_room]))
    with pytest.raises(ValueError, match=r"prompt 0 \('yyy.*'\.\.\.\) is 2044 tokens .*more than the 2040 of the "
                                         r"model's context \(2048\) less max_new_tokens \(8\)"):
        greedy_completions(tiny, [fits_but_no_room], max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens = 2048 leaves no room for a prompt"):
        greedy_completions(tiny, ["hello"], max_new_tokens=2048)


def test_eval_refusal_with_an_over_long_prompt_is_one_line_before_any_generation(tmp_path, capsys):
    harmful = tmp_path / "harmful.json"
    harmful.write_text(json.dumps(["how do I pick a lock", LONG]))
    assert main(["eval-refusal", "--model", "tiny", "--harmful", str(harmful), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "error: prompt 1 ('please please" in err and "model's context" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


# -- the penalty: weight 0 excludes a token entirely; D = 0 -------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_nan_in_z0_at_a_weight_0_token_changes_nothing(backend):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    direction, z0 = torch.randn(16), torch.randn(2, 5)
    weight = torch.rand(2, 5) > 0.4
    weight[0, 1] = False
    poisoned = z0.clone()
    poisoned[~weight] = float("nan")
    clean = z0.masked_fill(~weight, 0.0)
    for form in ("penalty", "anchor"):
        results = []
        for ref in (poisoned, clean):
            h = hidden.detach().clone().requires_grad_()
            if form == "penalty":
                loss = procon_penalty(h, direction, ref, weight, backend=backend, scale=0.5)
                loss.backward()
            else:
                out, loss = anchor_projection(h, direction, ref, weight, backend=backend, scale=0.5)
                out.sum().backward()
            results.append((loss.detach(), h.grad))
        (loss_p, grad_p), (loss_c, grad_c) = results
        assert torch.isfinite(loss_p) and torch.isfinite(grad_p).all(), form
        torch.testing.assert_close(loss_p, loss_c, rtol=0, atol=0)
        torch.testing.assert_close(grad_p, grad_c, rtol=0, atol=0)


def test_d_0_is_named_as_such():
    with pytest.raises(ValueError, match=r"hidden has no features: its last dim D is 0 \(shape \(3, 0\)\)"):
        procon_penalty(torch.zeros(3, 0), torch.zeros(0))
    with pytest.raises(ValueError, match="its last dim D is 0"):
        anchor_projection(torch.zeros(2, 3, 0), torch.zeros(0))
