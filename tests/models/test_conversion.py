"""fastprocon.models.conversion: checkpoints transformers converts while loading (GPT-NeoX's renamed
output layer, mixture-of-experts files with one tensor per expert, Gemma's embedding scale buffer)
load through the sharded meta-device path, with transformers' own rules, exactly as from_pretrained
loads them; fused experts are read per shard (each of 2 processes reads only its experts), and a
converter that cannot be split per shard (one tensor chunked into several) reads its source whole
and keeps each process's part.

Run as a script (under torchrun) this file is the 2-process test's worker.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))                  # families.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))    # test_train_distributed.torchrun
from families import save_family  # noqa: E402

import fastprocon.models.conversion as conversion  # noqa: E402
import fastprocon.models.load as load  # noqa: E402

CONVERTED = ["gpt_neox", "gemma2", "gemma3", "qwen3_moe", "mixtral"]
MOE = ["qwen3_moe", "mixtral"]
IDS = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(1))


def reference_logits(directory: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory).eval()(input_ids=IDS).logits


def expert_file_tensors(directory: Path) -> int:
    from fastprocon.models.loading import read_header
    return sum(".experts." in name for name in read_header(directory / "model.safetensors"))


def counting_reads(monkeypatch) -> list[int]:
    """Elements of every source tensor (or part) the converters read, in order."""
    reads, read_part = [], conversion.read_part

    def counted(file_slice, sharding, index, dtype):
        part = read_part(file_slice, sharding, index, dtype)
        if part is not None:
            reads.append(part.numel())
        return part
    monkeypatch.setattr(conversion, "read_part", counted)
    return reads


def refuse_whole_load(monkeypatch) -> None:
    def whole(*args, **kwargs):
        raise AssertionError("the model was loaded whole through from_pretrained")
    monkeypatch.setattr(load, "load_whole", whole)


@pytest.mark.parametrize("name", CONVERTED)
def test_converted_checkpoints_load_sharded_as_from_pretrained(tmp_path, monkeypatch, name):
    directory = save_family(name, tmp_path / name)
    refuse_whole_load(monkeypatch)
    reads = counting_reads(monkeypatch)
    model = load.load_model(str(directory)).model
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference_logits(directory))
    # each per-expert file tensor read once, whole (one process holds every expert)
    assert len(reads) == expert_file_tensors(directory) == (24 if name in MOE else 0)   # 2 layers x 4 experts x 3
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sum(reads) == expert_params


@pytest.mark.parametrize("name", ["gpt_neox", "qwen3_moe"])
def test_converted_checkpoints_load_sharded_under_lora(tmp_path, monkeypatch, name):
    """PEFT's names (base_model.model..., base_layer) over converted tensors: the adapters start at
    B = 0, so the logits are from_pretrained's."""
    from fastprocon.train import load_config
    from fastprocon.train.prepare import apply_lora

    directory = save_family(name, tmp_path / name)
    refuse_whole_load(monkeypatch)
    cfg = load_config("tiny", [f"spec={directory}", "lora=true"])
    model = load.load_model(str(directory), wrap=lambda m: apply_lora(cfg, m)).model
    assert any(".lora_A." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference_logits(directory))


def test_unmapped_file_tensors_still_load_whole_saying_so(tmp_path, caplog):
    """A file tensor no conversion rule maps: the sharded path refuses before taking memory and
    from_pretrained loads the model (here it refuses the unexpected tensor itself, in one line)."""
    from safetensors.torch import load_file, save_file

    directory = save_family("llama", tmp_path / "llama")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.mystery.weight"] = torch.zeros(3)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not fit the model \\(unexpected keys"):
        load.load_model(str(directory))
    assert "cannot be loaded sharded (1 file tensors such as 'model.layers.0.mystery.weight' fill no tensor of " \
           "LlamaForCausalLM, even by transformers' conversion rules)" in caplog.text


def test_a_missing_expert_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = save_family("qwen3_moe", tmp_path / "m")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.safetensors: cannot convert .* into 'model.layers.1.mlp.experts."
                                         "gate_up_proj' as transformers does: RuntimeError: Sizes of tensors"):
        load.load_model(str(directory))


def save_fused_mlp_llama(directory: Path) -> Path:
    """The llama family's model with each layer's gate and up projections stored as one tensor,
    'mlp.gate_up_fused.weight' (gate rows first): a checkpoint only a one-to-many converter loads."""
    from safetensors.torch import load_file, save_file

    save_family("llama", directory)
    tensors = load_file(directory / "model.safetensors")
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp."
        tensors[prefix + "gate_up_fused.weight"] = torch.cat([tensors.pop(prefix + "gate_proj.weight"),
                                                              tensors.pop(prefix + "up_proj.weight")])
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def fused_mlp_rule() -> list:
    """A conversion rule (transformers' own WeightConverter and Chunk) that splits the fused tensor."""
    from transformers.core_model_loading import Chunk, WeightConverter

    return [WeightConverter(source_patterns="mlp.gate_up_fused.weight",
                            target_patterns=["mlp.gate_proj.weight", "mlp.up_proj.weight"], operations=[Chunk(dim=0)])]


def register_fused_mlp_rule(monkeypatch) -> None:
    """Registered for model type llama (undone by ``monkeypatch``): from_pretrained applies it too."""
    import transformers.conversion_mapping as mapping

    mapping.get_checkpoint_conversion_mapping("llama")   # builds transformers' table
    monkeypatch.setitem(mapping._checkpoint_conversion_mapping_cache, "llama", fused_mlp_rule())


def test_a_splitting_converter_reads_its_source_whole_and_keeps_each_part(tmp_path, monkeypatch):
    directory = save_fused_mlp_llama(tmp_path / "fused")
    register_fused_mlp_rule(monkeypatch)
    refuse_whole_load(monkeypatch)
    reads = counting_reads(monkeypatch)
    model = load.load_model(str(directory)).model
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference_logits(directory))
    assert reads == [256 * 64] * 2   # each layer's fused tensor once


def worker(root: str) -> None:
    """Under torchrun (2 processes, gloo): each MoE family loaded with FSDP2 sharding; writes what
    this process read and its logits' agreement with from_pretrained."""
    import torch.distributed as dist

    from fastprocon.distributed.sharding import shard_for_inference

    dist.init_process_group("gloo")
    monkeypatch = pytest.MonkeyPatch()
    refuse_whole_load(monkeypatch)
    result = {}
    for name in MOE:
        directory = Path(root) / name
        reads = counting_reads(monkeypatch)
        model = load.load_model(str(directory), wrap=shard_for_inference).model
        with torch.no_grad():
            equal = torch.equal(model(input_ids=IDS).logits, reference_logits(directory))
        local = sum(conversion.local_slice(p).numel() for n, p in model.named_parameters() if ".experts." in n)
        full = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        result[name] = {"equal": equal, "reads": len(reads), "read_elements": sum(reads), "local": local,
                        "full": full, "file_tensors": expert_file_tensors(directory)}
    register_fused_mlp_rule(monkeypatch)   # a converter that cannot read per shard: whole, then its part kept
    reads = counting_reads(monkeypatch)
    model = load.load_model(str(Path(root) / "fused"), wrap=shard_for_inference).model
    with torch.no_grad():
        equal = torch.equal(model(input_ids=IDS).logits, reference_logits(Path(root) / "fused"))
    gate = model.model.layers[0].mlp.gate_proj.weight
    result["fused"] = {"equal": equal, "reads": reads, "local_rows": conversion.local_slice(gate).shape[0]}
    (Path(root) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def test_fused_experts_are_read_per_shard_on_two_processes(tmp_path):
    """Each process reads only its experts; a splitting converter (one fused tensor into gate and
    up) reads its source whole on each process and keeps its rows of each part."""
    from test_train_distributed import torchrun

    for name in MOE:
        save_family(name, tmp_path / name)
    save_fused_mlp_llama(tmp_path / "fused")
    torchrun(Path(__file__), tmp_path, nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in MOE:
        for rank in ranks:
            got = rank[name]
            assert got["equal"], name
            assert got["reads"] == got["file_tensors"] // 2, got      # 2 of the 4 experts, each read once
            assert got["read_elements"] == got["local"] == got["full"] // 2, got
    for rank in ranks:
        assert rank["fused"] == {"equal": True, "reads": [256 * 64] * 2, "local_rows": 64}


if __name__ == "__main__":
    worker(*sys.argv[1:])
