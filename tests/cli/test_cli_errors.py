"""The `fastprocon` entry point on bad input: output paths checked up front, one-line errors, exit 2."""
import argparse

import pytest

from fastprocon.cli import args as argtypes
from fastprocon.cli import main
from fastprocon.utils.io import check_output


@pytest.fixture
def no_model(monkeypatch):
    """Make loading a model fail loudly: the checks under test must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(argtypes, "load_model", refuse)


@pytest.fixture
def files(tmp_path):
    """An existing input file, an existing directory, and a regular file to put a path under."""
    (tmp_path / "in.json").write_text('["a harmful request"]')
    (tmp_path / "d.safetensors").write_bytes(b"not read: the output check comes first")
    (tmp_path / "dir").mkdir()
    return tmp_path


def _commands(t):
    """argv of each subcommand, with {out} for the --out value."""
    return {
        "reference": ["reference", "--model", "tiny", "--directions", str(t / "d.safetensors"), "--data", "benign",
                      "--max-length", "64", "--out", "{out}"],
        "eval-refusal": ["eval-refusal", "--model", "tiny", "--harmful", str(t / "in.json"), "--out", "{out}"],
        "directions": ["directions", "--model", "tiny", "--harmful", str(t / "in.json"), "--out", "{out}"],
        "drift": ["drift", "--directions", str(t / "d.safetensors"), "--checkpoints", "tiny", "--out", "{out}"],
    }


@pytest.mark.parametrize("command,out,message", [
    ("reference", "d.safetensors", "is the same file as --directions; refusing to overwrite an input"),
    ("eval-refusal", "in.json", "is the same file as --harmful; refusing to overwrite an input"),
    ("reference", "dir", "is a directory; give a file path"),
    ("eval-refusal", "dir", "is a directory; give a file path"),
    ("reference", "in.json/z0.safetensors", "in.json is a file, not a directory"),
    ("eval-refusal", "in.json/sub/x.json", "in.json is a file, not a directory"),
    ("directions", "in.json", "exists and is not a directory; give a directory path"),
    ("directions", "in.json/out", "in.json is a file, not a directory"),
    ("drift", "in.json", "exists and is not a directory; give a directory path"),
])
def test_bad_out_is_an_error_before_the_model_loads(files, no_model, capsys, command, out, message):
    before = {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()}
    argv = [str(files / out) if arg == "{out}" else arg for arg in _commands(files)[command]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastprocon {command}: error: --out {files / out}") and message in err
    assert len(err.strip().splitlines()) == 1      # one line, no traceback
    assert {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()} == before


def test_output_inside_an_output_directory_is_checked_against_the_inputs(tmp_path):
    (tmp_path / "drift.json").write_text("[]")
    with pytest.raises(ValueError, match="drift.json is the same file as --harmful"):
        check_output(tmp_path, {"--harmful": tmp_path / "drift.json"}, files=("drift.json", "drift.png"))
    (tmp_path / "drift.png").mkdir()
    with pytest.raises(ValueError, match="drift.png is a directory, but the command writes a file there"):
        check_output(tmp_path, {}, files=("drift.json", "drift.png"))
    # a symlink to an input is the same file; a missing input or a fresh output is fine
    (tmp_path / "link.json").symlink_to(tmp_path / "drift.json")
    with pytest.raises(ValueError, match="link.json is the same file as --data"):
        check_output(tmp_path / "link.json", {"--data": tmp_path / "drift.json"})
    assert check_output(tmp_path / "new" / "x.json", {"--data": tmp_path / "missing.json", "--model": None})


def test_bad_device_is_one_line_and_traceback_on_request(tmp_path, capsys, monkeypatch):
    argv = ["eval-refusal", "--model", "tiny", "--device", "foo", "--out", str(tmp_path / "x.json")]
    assert main(argv) == 2
    assert capsys.readouterr().err == ("fastprocon eval-refusal: error: --device 'foo' is not a device: use cpu, "
                                       "cuda, cuda:N or auto\n")
    monkeypatch.setenv("FASTPROCON_TRACEBACK", "1")
    with pytest.raises(ValueError, match="--device 'foo' is not a device"):
        main(argv)


def test_missing_input_file_is_a_user_error(tmp_path, capsys):
    assert main(["eval-refusal", "--model", "tiny", "--harmful", str(tmp_path / "nope.json"),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.startswith(f"fastprocon eval-refusal: error: data file not found: {tmp_path}")


def test_other_exceptions_keep_their_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not bad input")
    monkeypatch.setattr(argtypes, "load_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["eval-refusal", "--model", "tiny", "--out", str(tmp_path / "x.json")])


def test_reference_batch_size_zero_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reference", "--model", "tiny", "--directions", "d", "--data", "benign", "--max-length", "64",
              "--batch-size", "0", "--out", str(tmp_path / "z0.safetensors")])
    assert exit_info.value.code == 2
    assert "argument --batch-size: must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("parse,text,ok", [
    (argtypes.positive_int, "3", 3), (argtypes.positive_int, "0", None), (argtypes.positive_int, "x", None),
    (argtypes.non_negative_int, "0", 0), (argtypes.non_negative_int, "-1", None),
    (argtypes.finite_float, "-2.5", -2.5), (argtypes.finite_float, "nan", None),
    (argtypes.finite_float, "-inf", None),
])
def test_argument_types(parse, text, ok):
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError, match="must be .*, got"):
            parse(text)
    else:
        assert parse(text) == ok
