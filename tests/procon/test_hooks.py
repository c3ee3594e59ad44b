"""ProConHooks on the tiny model: the injected gradient equals the explicit penalty's, alpha = 0
costs nothing, activation checkpointing counts the penalty once, recording gives z."""
import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

import fastprocon.procon.hooks as hooks_module
from fastprocon import procon_penalty
from fastprocon.models.layers import decoder_layers
from fastprocon.models.load import load_model
from fastprocon.procon.hooks import ProConHooks, stack_recorded

LAYERS = [1, 3]


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 200, (2, 12), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    weight = torch.zeros(2, 12, dtype=torch.bool)
    weight[0, 5:] = True
    weight[1, 4:9] = True
    directions = torch.nn.functional.normalize(torch.randn(len(LAYERS), 64, generator=gen), dim=-1)
    z0 = torch.randn(len(LAYERS), 2, 12, generator=gen) * weight
    return input_ids, attention_mask, weight, directions, z0


def fresh_model():
    return load_model("tiny").model.train()


def loss_of(model, input_ids, attention_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def grads(model):
    return {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
            for n, p in model.named_parameters() if p.grad is not None}


def run_with_hooks(model, batch, scale=0.7, norm="l1", widths=None):
    """(grads, logged penalty, number of anchor_projection calls) of one forward/backward."""
    input_ids, attention_mask, weight, directions, z0 = batch
    hooks = ProConHooks(model, LAYERS, directions, norm=norm, widths=widths)
    with hooks.installed():
        hooks.arm(weight, z0, torch.tensor(scale))
        loss_of(model, input_ids, attention_mask).backward()
        hooks.disarm()
    return grads(model), hooks.take_penalty() * scale   # take_penalty is unscaled


def explicit_reference(batch, scale=0.7, norm="l1", widths=None):
    """The same loss with the penalty added explicitly on output_hidden_states (plain autograd)."""
    input_ids, attention_mask, weight, directions, z0 = batch
    model = fresh_model()
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    penalty = sum(procon_penalty(out.hidden_states[l], directions[row], z0[row], weight, scale=scale, norm=norm,
                                 delta=1.0 if widths is None else float(widths[row]), backend="reference")
                  for row, l in enumerate(LAYERS))
    (ce + penalty).backward()
    return grads(model), penalty.detach()


def assert_grads_close(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


# band: each layer its own half-width (a value per row of the directions)
@pytest.mark.parametrize("norm,widths", [("l1", None), ("band", torch.tensor([0.75, 0.25]))], ids=["l1", "band"])
def test_injected_gradient_equals_explicit_penalty(batch, norm, widths):
    got, penalty = run_with_hooks(fresh_model(), batch, norm=norm, widths=widths)
    want, want_penalty = explicit_reference(batch, norm=norm, widths=widths)
    torch.testing.assert_close(penalty, want_penalty, rtol=1e-5, atol=1e-6)
    assert penalty > 0
    if widths is not None:   # the rows' widths are not interchangeable: each layer gets its own
        _, swapped = explicit_reference(batch, norm=norm, widths=widths.flip(0))
        assert not torch.allclose(swapped, want_penalty, rtol=1e-3)
    assert_grads_close(got, want)
    # the penalty changes the gradient: without it the grads differ
    plain = fresh_model()
    loss_of(plain, *batch[:2]).backward()
    assert not torch.allclose(grads(plain)["model.layers.0.mlp.up_proj.weight"],
                              want["model.layers.0.mlp.up_proj.weight"])


def count_calls(monkeypatch):
    calls = []
    original = hooks_module.AnchorProjectionFunction

    class Counting:
        @staticmethod
        def apply(*args):
            calls.append(1)
            return original.apply(*args)

    monkeypatch.setattr(hooks_module, "AnchorProjectionFunction", Counting)
    return calls


def test_disarmed_hooks_launch_nothing(batch, monkeypatch):
    calls = count_calls(monkeypatch)
    input_ids, attention_mask, weight, directions, z0 = batch
    model = fresh_model()
    hooks = ProConHooks(model, LAYERS, directions)
    with hooks.installed():
        loss_of(model, input_ids, attention_mask).backward()   # alpha = 0: never armed
        assert calls == [] and torch.equal(hooks.take_penalty(), torch.zeros(()))
        hooks.arm(weight, z0, 1.0)
        loss_of(model, input_ids, attention_mask)
        assert len(calls) == len(LAYERS)
    hooks.disarm()
    loss_of(model, input_ids, attention_mask)   # removed on exit
    assert len(calls) == len(LAYERS)


@pytest.mark.parametrize("impl", [CheckpointImpl.NO_REENTRANT, CheckpointImpl.REENTRANT])
@pytest.mark.parametrize("hooks_inside", [False, True])
def test_activation_checkpointing_counts_penalty_once(batch, monkeypatch, impl, hooks_inside):
    want, want_penalty = explicit_reference(batch)
    calls = count_calls(monkeypatch)
    input_ids, attention_mask, weight, directions, z0 = batch
    model = fresh_model()
    layers = decoder_layers(model)
    hooks = ProConHooks(model, LAYERS, directions)

    def wrap():
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i], checkpoint_impl=impl)

    if not hooks_inside:
        wrap()   # the trainer's order: hooks on the wrappers, outside the recomputed region
    with hooks.installed():
        if hooks_inside:
            wrap()   # hooks stay on the inner layers: the backward recomputation runs them again
        hooks.arm(weight, z0, torch.tensor(0.7))
        loss_of(model, input_ids, attention_mask).backward()
    got = grads(model)
    assert_grads_close(got, want)
    torch.testing.assert_close(hooks.take_penalty() * 0.7, want_penalty, rtol=1e-5, atol=1e-6)
    assert len(calls) == len(LAYERS) * (2 if hooks_inside else 1)


def test_recording_gives_projections(batch):
    input_ids, attention_mask, weight, directions, z0 = batch
    model = fresh_model()
    hooks = ProConHooks(model, LAYERS, directions)
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        with hooks.installed(), hooks.recording() as recorded:
            model(input_ids=input_ids, attention_mask=attention_mask)
    z = stack_recorded(recorded)
    assert z.shape == (len(LAYERS), 2, 12) and z.dtype == torch.float32
    for row, l in enumerate(LAYERS):
        torch.testing.assert_close(z[row], hidden[l] @ directions[row], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no projection was recorded"):
        stack_recorded([None, z[0]])


def test_bad_arguments(batch):
    input_ids, attention_mask, weight, directions, z0 = batch
    model = fresh_model()
    with pytest.raises(ValueError, match=r"directions must be \[2, D\]"):
        ProConHooks(model, LAYERS, directions[:1])
    with pytest.raises(ValueError, match="distinct indices in 0..3"):
        ProConHooks(model, [1, 4], directions)
    with pytest.raises(ValueError, match="distinct indices"):
        ProConHooks(model, [1, 1], directions)
    with pytest.raises(ValueError, match=r"widths must be a float \[2\] tensor"):
        ProConHooks(model, LAYERS, directions, norm="band", widths=torch.ones(3))
    with pytest.raises(ValueError, match="widths must be finite and >= 0"):
        ProConHooks(model, LAYERS, directions, norm="band", widths=torch.tensor([0.5, -1.0]))
    with pytest.raises(RuntimeError, match="norm='band' needs the per-layer band widths"):
        ProConHooks(model, LAYERS, directions, norm="band").arm(weight, z0, 1.0)
    hooks = ProConHooks(model, LAYERS, directions)
    with pytest.raises(ValueError, match=r"z0 must be \[2, B, T\]"):
        hooks.arm(weight, z0[:, :, :5], 1.0)
    hooks.arm(weight, z0, 1.0)
    with pytest.raises(RuntimeError, match="while the hooks are armed"):
        with hooks.recording():
            pass
