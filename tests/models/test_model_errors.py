"""Model inputs that are one line, naming the problem: a model directory without tokenizer files,
a model class whose decoder layers fastprocon cannot find (a ValueError, so the command line
reports it as bad input, not a traceback)."""
import pytest

from fastprocon.cli import main
from fastprocon.models.layers import decoder_layers
from fastprocon.models.load import load_model


def test_a_model_directory_without_tokenizer_files_is_named(tmp_path, capsys):
    load_model("tiny").model.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["directions", "--model", str(tmp_path / "m"), "--max-prompts", "4", "--no-quality",
                 "--out", str(tmp_path / "d.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"model directory {tmp_path / 'm'} has no tokenizer files (none of tokenizer.json, " in err
    assert len(err.strip().splitlines()) == 1


def test_a_model_class_without_known_decoder_layers_is_bad_input():
    from transformers import MptConfig, MptForCausalLM
    model = MptForCausalLM(MptConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=260, max_seq_len=64))
    with pytest.raises(ValueError, match=r"cannot find the decoder layers of MptForCausalLM: expected a ModuleList "
                                         r"at model.layers"):
        decoder_layers(model)


def test_nan_weights_are_named_by_file_and_tensor_where_they_are_read(tmp_path):
    from safetensors.torch import load_file, save_file
    loaded = load_model("tiny")
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{file}: tensor '{name}' has non-finite values \(NaN or inf\)"):
        load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("damaged", ["model.safetensors", "directions.safetensors"])
def test_a_safetensors_file_with_a_damaged_header_is_named(tmp_path, damaged):
    import torch
    from safetensors.torch import save_file
    loaded = load_model("tiny")
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    save_file({"r": torch.ones(4, 8)}, tmp_path / "m" / "directions.safetensors")   # as an export leaves it
    file = tmp_path / "m" / damaged
    data = file.read_bytes()
    at = data.index(b'"dtype"')   # the JSON stays valid; a tensor loses its dtype field
    file.write_bytes(data[:at] + b'"dtyp_"' + data[at + 7:])
    with pytest.raises(ValueError, match=rf"{file}: not a readable safetensors file \(.*missing field `dtype`"):
        load_model(str(tmp_path / "m"))
