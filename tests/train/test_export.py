"""The sharded export of LoRA runs (merged weights, and the adapter in PEFT's format on request),
on 1 process and under torchrun (there split into several files), and the pieces of
train/export.py (file split, the merge of a shard).

Run as a script (under torchrun) this file is a training worker whose export uses small files."""
import json
import shutil
import sys

import pytest
import torch
from test_train_distributed import torchrun

from fastprocon.models.load import load_model
from fastprocon.train import load_config, train
from fastprocon.train.export import _merged, file_index

LORA = ["model.lora=true", "lora_rank=4", "reference=adapters_off", "max_steps=2", "lr=1e-2", "log_every=1",
        "checkpoint_every=0", "export=true", "export_adapter=true"]


def weights(export) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """A LoRA run on 2 processes whose export is split into files of ~200 kB (small_files_worker),
    and the export of its last checkpoint by 1 process (one file)."""
    two = tmp_path_factory.mktemp("lora2")
    torchrun(__file__, two, *LORA)
    one = tmp_path_factory.mktemp("lora1") / "run"
    shutil.copytree(two, one, ignore=shutil.ignore_patterns("model", ".lock"))
    result = train(load_config("tiny", [f"run_dir={one}", *LORA]))   # nothing left to train: the export only
    assert result.start_step == 2
    return two, one


def test_lora_export_is_merged_like_peft_and_keeps_the_adapter(lora_runs):
    """The merged export equals PEFT's merge_and_unload of the exported adapter on the base model, and
    the adapter on the base model gives the merged model's logits."""
    from peft import PeftModel

    two, _ = lora_runs
    merged, got = weights(two / "model")
    config = json.loads((two / "model" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    base = load_model("tiny").model
    adapted = PeftModel.from_pretrained(base, str(two / "model" / "adapter"))
    ids = torch.arange(2, 50)[None]
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
    want = adapted.merge_and_unload().state_dict()
    assert got.keys() == want.keys()
    changed = [k for k in got if not torch.equal(got[k], load_model("tiny").model.state_dict()[k])]
    assert changed and all("self_attn" in k for k in changed), changed   # LoRA on the attention only
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)


def test_lora_export_of_two_processes_equals_one_process(lora_runs):
    """The same weights from 2 processes (several files) and from 1 (one file): bitwise where nothing
    was merged (the consolidation copies bytes), to fp32 rounding where each process merged its rows."""
    two, one = lora_runs
    (_, a), (_, b) = weights(two / "model"), weights(one / "model")
    assert a.keys() == b.keys()
    for key in a:
        if ".self_attn." in key:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def test_an_export_in_several_files_has_the_usual_names_and_index(lora_runs):
    from safetensors import safe_open

    two, one = lora_runs
    assert [p.name for p in (one / "model").glob("model*.safetensors")] == ["model-00001-of-00001.safetensors"]
    index = json.loads((two / "model" / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    assert len(names) >= 3 and names == [f"model-{i:05d}-of-{len(names):05d}.safetensors"
                                         for i in range(1, len(names) + 1)]
    assert sorted(p.name for p in (two / "model").glob("model*.safetensors")) == names
    assert not (two / "model" / ".sharded").exists() and not list((two / "model").glob("shard-*"))
    for name in names:
        with safe_open(str(two / "model" / name), "pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == name}
    headers = sum(8 + int.from_bytes((two / "model" / n).read_bytes()[:8], "little") for n in names)
    assert index["metadata"]["total_size"] == sum((two / "model" / n).stat().st_size for n in names) - headers


def test_export_adapter_needs_a_lora_run():
    with pytest.raises(ValueError, match="checkpoint.export_adapter = True: must be false unless"):
        load_config("tiny", ["export_adapter=true"])


def test_file_index_starts_a_new_file_at_the_limit_and_groups_within_files():
    state = {"a": torch.zeros(10), "b": torch.zeros(10), "c": torch.zeros(30), "d": torch.zeros(1)}
    files = file_index(state, 80)
    assert files == {"a": 1, "b": 1, "c": 2, "d": 3}   # 40 + 40, 120 alone, 4 bytes
    assert file_index(state, 10**9) == dict.fromkeys(state, 1)
    assert file_index(state, 40) == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert file_index(state, 10**9, within={"a": 1, "b": 2, "c": 2, "d": 2}) == {"a": 1, "b": 2, "c": 2, "d": 2}
    assert file_index(state, 100, within={"a": 1, "b": 1, "c": 1, "d": 2}) == {"a": 1, "b": 1, "c": 2, "d": 3}


def small_files_worker(run_dir: str, *overrides: str) -> int:
    """A tiny run whose export is split into files of ~200 kB (pieces of ~50 kB a process)."""
    import fastprocon.train.export as export
    from fastprocon.cli import main

    export.FILE_BYTES, export.PIECE_BYTES = 200_000, 50_000
    return main(["train", "--config", "tiny", f"run_dir={run_dir}", *overrides])


@pytest.mark.parametrize("transposed", [False, True])
def test_merge_of_a_plain_weight_is_peft_s_delta(transposed):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    w = torch.randn((7, 5) if transposed else (5, 7), generator=g, dtype=torch.float64)
    delta = (b.double() @ a.double()) * 0.5
    want = w + (delta.T if transposed else delta)
    torch.testing.assert_close(_merged(w, a.double(), b.double(), 0.5, transposed), want)


if __name__ == "__main__":
    sys.exit(small_files_worker(*sys.argv[1:]))
