"""fastprocon.models.loading: meta-device build + sharded safetensors loading, against from_pretrained.

On 1 process here; on 2 processes (torchrun, gloo) by the combined test at the end, which also
runs `directions`, `drift` and `eval-refusal` sharded and compares them with 1-process runs.
Run as a script (under torchrun) this file is that test's worker.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]])


def make_untied_dir(path: Path) -> Path:
    """A random untied 3-layer Llama saved as bf16 safetensors in several files (with an index)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastprocon.models.specs import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(7)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="30KB")
    tok.save_pretrained(path)
    return path


def reference_logits(directory: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def lora_cfg():
    from fastprocon.train import load_config
    return load_config("tiny", ["model.lora=true", "model.lora_rank=4", "seed=3"])


def sharded_checks(untied: Path, out: Path) -> dict:
    """What both the 1-process test and the 2-process worker compute: logits (tied, untied
    multi-file bf16 -> fp32, LoRA), the fingerprints, and the LoRA init (full tensors)."""
    import torch.distributed as dist

    from fastprocon.distributed.sharding import shard_for_inference
    from fastprocon.models.load import load_model
    from fastprocon.models.specs import model_dir
    from fastprocon.train.prepare import apply_lora

    sharded = dist.is_initialized()
    shard = shard_for_inference if sharded else None
    results = {}
    for name, spec in (("tied", "tiny"), ("untied", str(untied))):
        loaded = load_model(spec, wrap=shard)
        with torch.no_grad():
            logits = loaded.model(IDS).logits
        assert torch.equal(logits, reference_logits(model_dir(spec)[0])), name
        results[name] = loaded.fingerprint
    cfg = lora_cfg()

    def lora_wrap(model):
        model = apply_lora(cfg, model)
        return shard(model) if shard else model
    loaded = load_model("tiny", wrap=lora_wrap, seed=cfg.train.seed)
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS).logits, reference_logits(model_dir("tiny")[0]))   # B = 0
    lora = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in loaded.model.state_dict().items() if ".lora_" in k}
    assert lora and all(v.abs().sum() > 0 for k, v in lora.items() if "lora_A" in k)
    assert all(v.abs().sum() == 0 for k, v in lora.items() if "lora_B" in k)
    results["lora_fingerprint"] = loaded.fingerprint
    if not sharded or dist.get_rank() == 0:
        torch.save(lora, out / f"lora_{'sharded' if sharded else 'single'}.pt")
    return results


def test_sharded_loading_equals_from_pretrained_on_one_process(tmp_path):
    untied = make_untied_dir(tmp_path / "untied")
    assert (untied / "model.safetensors.index.json").is_file() and len(list(untied.glob("*.safetensors"))) > 1
    results = sharded_checks(untied, tmp_path)
    assert results["lora_fingerprint"] == results["tied"]        # adapters are not part of the base model
    from fastprocon.models.load import load_model
    assert load_model(str(untied), dtype=torch.bfloat16).fingerprint == results["untied"]


@pytest.fixture
def tiny_dir(tmp_path):
    from fastprocon.models.load import load_model
    loaded = load_model("tiny")
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _rewrite(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_bad_weights_are_one_line_naming_file_and_tensor(tiny_dir):
    from fastprocon.models.load import load_model
    weights = tiny_dir / "model.safetensors"
    original = weights.read_bytes()
    name = "model.layers.1.mlp.up_proj.weight"

    _rewrite(weights, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"^{weights}: no tensor '{name}' \\(shape \\[128, 64\\]\\)") as err:
        load_model(str(tiny_dir))
    assert "\n" not in str(err.value)

    weights.write_bytes(original)
    _rewrite(weights, lambda t: t.update({name: torch.zeros(64, 128)}))
    with pytest.raises(ValueError, match=f"^{weights}: tensor '{name}' has shape \\[64, 128\\] but the model .* "
                                         "expects \\[128, 64\\]"):
        load_model(str(tiny_dir))

    weights.write_bytes(original[:-1000])
    with pytest.raises(ValueError, match=f"^{weights}: truncated: tensor '[\\w.]+' ends at byte \\d+ but the "
                                         f"file has {len(original) - 1000} bytes"):
        load_model(str(tiny_dir))


def test_index_naming_a_missing_file(tmp_path):
    from fastprocon.models.load import load_model
    untied = make_untied_dir(tmp_path / "untied")
    victim = sorted(untied.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"names {victim.name}, which is missing"):
        load_model(str(untied))


def test_fingerprint_version_is_checked(tmp_path):
    from fastprocon.models.fingerprint import check_fingerprint_version
    check_fingerprint_version({}, "f", "x")   # files from before the field: version 1, unchanged since
    with pytest.raises(ValueError, match="f was made for another model version .*: rebuild it with x"):
        check_fingerprint_version({"fingerprint_version": 0}, "f", "x")


def _tool_args(out: Path, tag: str, directions: Path | None = None) -> list[list[str]]:
    common = ["--model", "tiny", "--device", "cpu"]
    return [["directions", *common, "--max-prompts", "6", "--max-val-prompts", "4", "--batch-size", "4",
             "--out", str(out / f"dir_{tag}")],
            ["drift", "--directions", str(directions or out / f"dir_{tag}" / "directions.safetensors"),
             "--checkpoints", "tiny", "--device", "cpu", "--batch-size", "4", "--out", str(out / f"drift_{tag}")],
            ["eval-refusal", *common, "--max-prompts", "3", "--max-new-tokens", "3", "--batch-size", "2",
             "--out", str(out / f"eval_{tag}.json")]]


def worker(untied: str, out: str) -> None:
    """Under torchrun: the sharded checks and the three tools, in one process group."""
    import torch.distributed as dist

    from fastprocon.cli import main
    dist.init_process_group("gloo")
    out = Path(out)
    results = sharded_checks(Path(untied), out)
    for argv in _tool_args(out, "sharded"):
        assert main(argv) == 0, argv
    if dist.get_rank() == 0:
        (out / "sharded.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_load_and_run_the_tools_like_one(tmp_path):
    """2 processes (FSDP2 on gloo): logits equal from_pretrained's, fingerprints and LoRA init equal
    the 1-process ones, and directions / drift / eval-refusal give the 1-process results."""
    from fastprocon.cli import main
    from fastprocon.refusal.directions import load_directions

    untied = make_untied_dir(tmp_path / "untied")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(Path(__file__)), str(untied), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    single = sharded_checks(untied, tmp_path)
    assert json.loads((tmp_path / "sharded.json").read_text()) == single
    lora_1, lora_2 = (torch.load(tmp_path / f"lora_{t}.pt") for t in ("single", "sharded"))
    assert lora_1.keys() == lora_2.keys() and all(torch.equal(lora_1[k], lora_2[k]) for k in lora_1)

    for argv in _tool_args(tmp_path, "single"):
        assert main(argv) == 0, argv
    one, two = (load_directions(tmp_path / f"dir_{t}" / "directions.safetensors") for t in ("single", "sharded"))
    torch.testing.assert_close(two.directions, one.directions, rtol=0, atol=1e-6)
    torch.testing.assert_close(two.norms, one.norms, rtol=1e-6, atol=0)
    assert two.metadata["fingerprint"] == one.metadata["fingerprint"]
    quality = [json.loads((tmp_path / f"dir_{t}" / "quality.json").read_text()) for t in ("single", "sharded")]
    assert [row["auroc"] for row in quality[0]["layers"]] == [row["auroc"] for row in quality[1]["layers"]]
    drift = [json.loads((tmp_path / f"drift_{t}" / "drift.json").read_text()) for t in ("single", "sharded")]
    for a, b in zip(drift[0]["checkpoints"][0]["cosine"], drift[1]["checkpoints"][0]["cosine"]):
        assert (a is None and b is None) or abs(a - b) < 1e-6
    evals = [json.loads((tmp_path / f"eval_{t}.json").read_text()) for t in ("single", "sharded")]
    assert [r["completion"] for r in evals[0]["completions"]] == [r["completion"] for r in evals[1]["completions"]]
    assert evals[0]["metrics"]["harmful_refusal_rate"] == evals[1]["metrics"]["harmful_refusal_rate"]
    for a, b in zip(evals[0]["completions"], evals[1]["completions"]):
        assert abs(a["refusal_score"] - b["refusal_score"]) < 1e-4


if __name__ == "__main__":
    worker(*sys.argv[1:])
