"""Start-up checks that a faster path computes what the plain one computes on the loaded model:
packed rows (:func:`fastprocon.train.packing.check_packing_exact`), the chunked cross entropy
(:func:`fastprocon.train.chunked_ce.check_chunked_ce_exact`) and compiled decoder layers (here).
Each runs a short fixed input both ways and returns None, or a sentence saying what differed;
:func:`exceeds` is the measure they share: the largest difference, against the tolerance times
the larger of the largest expected value and 1."""
from __future__ import annotations

import torch
from torch import Tensor, nn

import fastprocon.distributed as D
from fastprocon.models.layers import decoder_layers, unwrap_model


def exceeds(actual: Tensor, expected: Tensor, tolerance: float) -> tuple[float, float] | None:
    """(max |actual - expected|, max |expected|) when the first is more than ``tolerance`` times
    max(max |expected|, 1), else None. Compared in fp32; one host sync."""
    actual, expected = actual.float(), expected.float()
    diff, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    return (diff, scale) if not diff <= tolerance * max(scale, 1.0) else None   # NaN exceeds


def compile_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a compiled layer against the eager one: compiled kernels fuse and
    reorder (reductions, fp32 intermediates the eager ops round to ``dtype``), so they are not
    bitwise; 4 units of ``dtype``'s last place of the largest output, at least 1e-3 (fp32: 1e-3,
    fp16: 3.9e-3, bf16: 3.1e-2)."""
    return max(1e-3, 4 * torch.finfo(dtype).eps)


def _hidden(output) -> Tensor:
    """A decoder layer's output hidden states (transformers returns them alone or first in a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def check_compiled_layers_exact(model: nn.Module, *, length: int = 7) -> str | None:
    """None when every compiled decoder layer (``torch.compile`` d, see
    :func:`fastprocon.distributed.compile_decoder_layers`) gives the eager layer's output within
    :func:`compile_tolerance` on a fixed input of ``length`` tokens, each layer fed the eager run's
    own inputs; else a sentence naming the first layer that differs. One eager forward of the
    model and one compiled call per layer (a compilation of the layers' inference graph): run it
    on every process together (FSDP gathers each layer)."""
    layers = [(i, layer) for i, layer in enumerate(decoder_layers(model)) if hasattr(layer, "_orig_mod")]
    if not layers:
        return None
    calls: list[tuple[tuple, dict, Tensor]] = []
    handles = [layer.register_forward_hook(lambda _, args, kwargs, out: calls.append((args, kwargs, _hidden(out))),
                                           with_kwargs=True) for _, layer in layers]
    param = next(model.parameters())
    vocab = unwrap_model(model).get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(param.device)
    try:
        with torch.compiler.set_stance("force_eager"):
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for (index, layer), (args, kwargs, eager) in zip(layers, calls):
        tolerance = compile_tolerance(eager.dtype)
        bad = exceeds(_hidden(layer(*args, **kwargs)), eager, tolerance)
        if bad is not None:
            return (f"compiled decoder layer {index} differs from the eager layer by up to {bad[0]:.3g} (outputs up "
                    f"to {bad[1]:.3g}, {eager.dtype}; tolerance {tolerance:.2g} x max(|output|, 1))")
    return None


def eager_layers(model: nn.Module) -> None:
    """Run the compiled decoder layers eagerly from now on, in place: each compiled wrapper
    (which FSDP2 shards, so it stays) calls its original module instead of the compiled code."""
    for layer in decoder_layers(model):
        if hasattr(layer, "_orig_mod"):
            layer.forward = layer._orig_mod.__call__


def use_compiled_layers(setting: str, model: nn.Module) -> tuple[bool, str | None]:
    """Whether to keep ``model``'s compiled decoder layers for config ``model.compile`` = ``setting``
    ("auto": where :func:`check_compiled_layers_exact` passes, else eager layers, said in the
    note; "on": must pass, a ValueError otherwise), and a note to print. A model without compiled
    layers: (False, None). Collective under torchrun (every process gets the same answer)."""
    if not any(hasattr(layer, "_orig_mod") for layer in decoder_layers(model)):
        return False, None
    why = D.first_error(check_compiled_layers_exact(model))
    if why is None:
        return True, None
    if setting == "on":
        raise ValueError(f"config model.compile = 'on', but {why}; use model.compile = 'auto' (eager layers where "
                         "they differ) or 'off'")
    eager_layers(model)
    return False, f"compiled layers off: {why}; the layers run eagerly"
