"""Compiled decoder layers are kept only where they give the eager layers' output (within the
stated tolerance) on the loaded model: checked at start-up; model.compile = "auto" falls back to
eager layers saying so in one line, "on" refuses. Inductor on CPU on the tiny model (one small
compilation); the failures through a test backend whose kernels are off by a set factor."""
import functools
import json
import sys
from pathlib import Path

import pytest
import torch

import fastprocon.distributed as D
from fastprocon.models import decoder_layers, load_model
from fastprocon.train import Trainer, load_config
from fastprocon.train.exactness import check_compiled_layers_exact, compile_tolerance, use_compiled_layers

IDS = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(4))


def scaling_backend(factor: float):
    """A torch.compile backend running dynamo's graph eagerly with every float output times ``factor``."""
    def backend(graph, example_inputs):
        def run(*args):
            out = graph(*args)
            return type(out)(o * factor if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
        return run
    return backend


def compiled_tiny(backend) -> torch.nn.Module:
    torch._dynamo.reset()
    model = load_model("tiny").model
    D.compile_decoder_layers(decoder_layers(model), backend=backend)
    return model


def test_inductor_layers_give_the_eager_output_on_tiny():
    model = compiled_tiny("inductor")
    assert check_compiled_layers_exact(model) is None
    assert use_compiled_layers("on", model) == (True, None)


def layer_output_maxima() -> list[float]:
    """max |output| of each of tiny's decoder layers on the check's input (eager)."""
    model, maxima = load_model("tiny").model, []
    for layer in decoder_layers(model):
        layer.register_forward_hook(lambda _, args, out: maxima.append(float(out.abs().max())))
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
    return maxima


def test_the_check_holds_the_stated_tolerance():
    tolerance = compile_tolerance(torch.float32)
    assert tolerance == 1e-3 and compile_tolerance(torch.bfloat16) == 4 * 2 ** -7
    maxima = layer_output_maxima()
    assert max(maxima) < 1   # so the tolerance is tolerance x 1 here: outputs x (1 + e) differ by e x max |output|
    assert check_compiled_layers_exact(compiled_tiny(scaling_backend(1 + tolerance / 2 / max(maxima)))) is None
    why = check_compiled_layers_exact(compiled_tiny(scaling_backend(1 + 2 * tolerance / maxima[0])))
    assert why.startswith("compiled decoder layer 0 differs from the eager layer by up to 0.002 "), why
    assert "torch.float32; tolerance 0.001 x max(|output|, 1)" in why


def test_auto_runs_eager_layers_where_compiled_ones_differ_and_on_refuses():
    model = compiled_tiny(scaling_backend(1.1))
    keep, note = use_compiled_layers("auto", model)
    assert not keep and note.startswith("compiled layers off: compiled decoder layer 0 differs") and "\n" not in note
    with torch.no_grad():   # the eager layers from now on: exactly the uncompiled model's logits
        assert torch.equal(model(IDS).logits, load_model("tiny").model(IDS).logits)
    with pytest.raises(ValueError, match="^config model.compile = 'on', but compiled decoder layer 0 differs .*; use "
                                         "model.compile = 'auto'"):
        use_compiled_layers("on", compiled_tiny(scaling_backend(1.1)))


def first_step_ce(tmp_path, *overrides) -> tuple[float, bool]:
    cfg = load_config("tiny", ["schedule=off", "max_steps=1", "batch_size=2", "micro_batch_size=2", "packing=off",
                               f"run_dir={tmp_path}", "export=false", *overrides])
    ctx = D.init_distributed("cpu")
    try:
        trainer = Trainer(cfg, ctx)
        trainer.accumulate_gradients(0)
        result = float(trainer._acc[0]), trainer.compiled
        del trainer
    finally:
        D.shutdown(ctx)
    return result


def test_the_trainer_checks_compiled_layers_at_start_up(tmp_path, monkeypatch, capsys):
    """compile = "auto" (made to compile on CPU here) with layers that differ: eager layers, one line,
    the eager step's CE exactly; compile = "on": refused before training."""
    eager_ce, compiled = first_step_ce(tmp_path / "off", "compile=off")
    assert not compiled
    monkeypatch.setattr(D, "use_compile", lambda setting, device: setting != "off")
    torch._dynamo.reset()
    monkeypatch.setattr(D, "compile_decoder_layers",
                        functools.partial(D.compile_decoder_layers, backend=scaling_backend(1.1)))
    capsys.readouterr()
    ce, compiled = first_step_ce(tmp_path / "auto", "compile=auto")
    assert not compiled and ce == eager_ce
    lines = [line for line in capsys.readouterr().out.splitlines() if "compiled layers off" in line]
    assert len(lines) == 1 and "the layers run eagerly" in lines[0], lines
    with pytest.raises(ValueError, match="^config model.compile = 'on', but compiled decoder layer 0 differs"):
        first_step_ce(tmp_path / "on", "compile=on")


def worker(out: str) -> None:
    """Under torchrun (2 processes, gloo): the check on FSDP2-sharded compiled layers, once with
    layers that agree (dynamo's graph run eagerly) and once with layers that differ."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    with torch.no_grad():
        reference = load_model("tiny").model(IDS).logits
    results = {}
    for name, backend in (("agree", "eager"), ("differ", scaling_backend(1.1))):
        torch._dynamo.reset()

        def wrap(model, backend=backend):
            D.compile_decoder_layers(decoder_layers(model), backend=backend)
            return D.shard_for_inference(model)
        model = load_model("tiny", wrap=wrap).model
        with torch.no_grad():
            keep, note = use_compiled_layers("auto", model)
            results[name] = {"keep": keep, "note": note, "equal": torch.equal(model(IDS).logits, reference)}
    (Path(out) / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_the_check_runs_on_sharded_layers_under_two_processes(tmp_path):
    from test_train_distributed import torchrun

    torchrun(Path(__file__), tmp_path, nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["agree"] == {"keep": True, "note": None, "equal": True}
    differ = ranks[0]["differ"]
    assert not differ["keep"] and differ["note"].startswith("compiled layers off: compiled decoder layer 0 differs")
    assert differ["equal"]   # eager layers from then on


if __name__ == "__main__":
    worker(*sys.argv[1:])
