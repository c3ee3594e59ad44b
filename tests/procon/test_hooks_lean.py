"""The hooks' lean per-layer path (directions, weight and z0 prepared once; the autograd Function
called directly) gives bit for bit what the public API gives at every layer: the penalty of each
layer and every parameter's gradient, torch.equal, on the tiny model, padded and packed, for each
norm, both ProCon reductions' scales, the torch and Triton (interpreted) backends."""
import pytest
import torch

from fastprocon import anchor_projection, procon_penalty
from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.data.tokenize import TokenizedExample, collate
from fastprocon.models.load import load_model
from fastprocon.procon.config import procon_scale
from fastprocon.procon.hooks import ProConHooks, stack_recorded
from fastprocon.refusal.steering import on_layer_inputs
from fastprocon.train import packing
from fastprocon.train.loss import ce_sum, shift_labels

LAYERS = [0, 2, 3]
D = 64


def micro_batch(layout: str) -> dict:
    """A padded [3, T] batch or its packed [1, sum of lengths] row; "weight" (response mask) and
    "z0" ([len(LAYERS), B, T], NaN at one prompt token: excluded by its weight 0) added."""
    gen = torch.Generator().manual_seed(5)
    samples = []
    for i, n in enumerate([9, 4, 13]):
        ids = torch.randint(3, 200, (n,), generator=gen).tolist()
        samples.append(TokenizedExample(f"s:{i}", ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    batch = collate(samples, 0)
    batch["targets"] = shift_labels(batch["labels"])
    z0 = torch.randn(len(LAYERS), *batch["labels"].shape, generator=gen)
    z0[:, 0, 0] = float("nan")
    if layout == "packed":
        mask = batch["attention_mask"].bool()
        batch = packing.pack_collated(batch)
        z0 = packing.pack_like(z0, mask)
    batch["weight"] = batch["labels"] != IGNORE_INDEX
    batch["z0"] = z0
    return batch


def directions() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(len(LAYERS), D, generator=gen) * torch.tensor([[1.0], [3e-3], [40.0]])  # not unit length


def run(layout, norm, scale, backend, public: bool):
    """(the public API's (unscaled, scaled) penalty per layer, or the hooks' logged total, and every
    parameter's gradient) of one forward + backward."""
    torch.manual_seed(0)
    model = load_model("tiny").model.train()
    mb = micro_batch(layout)
    dirs = directions()
    widths = torch.tensor([0.3, 0.05, 1.5])
    delta = 0.4
    penalties = []
    if public:   # the public API at every layer, as the hooks called it before their lean path
        def hook(row, hidden):
            width = widths.index_select(0, row)[0] if norm == "band" else delta
            out, penalty = anchor_projection(hidden, dirs.index_select(0, row)[0], mb["z0"].index_select(0, row)[0],
                                             mb["weight"], norm=norm, delta=width, scale=scale, backend=backend,
                                             validate=False)
            unscaled = procon_penalty(hidden.detach(), dirs.index_select(0, row)[0], mb["z0"].index_select(0, row)[0],
                                      mb["weight"], norm=norm, delta=width, backend=backend, validate=False)
            penalties.append((unscaled, penalty))
            return out
        keys = [torch.tensor([row]) for row in range(len(LAYERS))]
        context = on_layer_inputs(model, hook, LAYERS, keys=keys)
        hooks = None
    else:
        hooks = ProConHooks(model, LAYERS, dirs, norm=norm, delta=delta, backend=backend,
                            widths=widths if norm == "band" else None)
        context = hooks.installed()
    with context:
        if hooks is not None:
            hooks.arm(mb["weight"], mb["z0"], scale)
        out = model(**packing.forward_kwargs(mb, varlen_kwargs=False), use_cache=False)
        if hooks is not None:   # layer by layer, from the running total (layers run in order)
            total = hooks.take_penalty()
        ce_sum(out.logits, mb["targets"]).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return penalties, (total if hooks is not None else None), grads


SCALES = {"sample": procon_scale(0.3, "sample", 1, 3, 17), "token": procon_scale(0.3, "token", 1, 3, 17)}
CASES = [(layout, norm, reduction, "torch") for layout in ("padded", "packed")
         for norm in ("l1", "l2sq", "huber", "band") for reduction in SCALES]
CASES += [("padded", "l1", "token", "triton"), ("packed", "band", "sample", "triton")]


@pytest.mark.parametrize("layout,norm,reduction,backend", CASES)
def test_lean_hooks_equal_the_public_api_bit_for_bit(layout, norm, reduction, backend):
    scale = torch.tensor(SCALES[reduction])
    want_penalties, _, want_grads = run(layout, norm, scale, backend, public=True)
    _, total, grads = run(layout, norm, scale, backend, public=False)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert torch.equal(grads[name], want), name
    # the logged total is unscaled: the layers' unscaled losses added in layer order, from zero
    unscaled = [loss for loss, _ in want_penalties]
    assert torch.equal(total, torch.zeros(()) + unscaled[0] + unscaled[1] + unscaled[2]) and total > 0
    # and the public API's penalty is that loss times the scale
    for loss, penalty in want_penalties:
        assert torch.equal(penalty, loss * scale)


def test_take_penalty_is_unscaled_and_never_none():
    model = load_model("tiny").model.train()
    mb = micro_batch("padded")
    hooks = ProConHooks(model, LAYERS, directions())
    zero = hooks.take_penalty()
    assert torch.equal(zero, torch.zeros(())) and zero is not hooks.take_penalty()   # a new tensor each time
    with hooks.installed():
        kwargs = packing.forward_kwargs(mb, varlen_kwargs=False)
        totals = []
        for scale in (1.0, 0.25):
            hooks.arm(mb["weight"], mb["z0"], torch.tensor(scale))
            model(**kwargs, use_cache=False)
            hooks.disarm()
            totals.append(hooks.take_penalty())
    assert torch.equal(totals[0], totals[1]) and totals[0] > 0
    assert torch.equal(hooks.take_penalty(), torch.zeros(()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_recorded_projections_equal_the_public_api_bit_for_bit(backend):
    model = load_model("tiny").model.train()
    mb = micro_batch("padded")
    dirs = directions()
    hooks = ProConHooks(model, LAYERS, dirs, backend=backend)
    kwargs = packing.forward_kwargs(mb, varlen_kwargs=False)
    with torch.no_grad():
        hidden = model(**kwargs, use_cache=False, output_hidden_states=True).hidden_states
        with hooks.installed(), hooks.recording() as recorded:
            model(**kwargs, use_cache=False)
    z = stack_recorded(recorded)
    for row, layer in enumerate(LAYERS):
        _, want = procon_penalty(hidden[layer], dirs[row], backend=backend, return_projection=True)
        assert torch.equal(z[row], want), layer


def test_a_layer_input_of_another_shape_is_refused():
    model = load_model("tiny").model.train()
    mb = micro_batch("padded")
    hooks = ProConHooks(model, LAYERS, directions())
    with hooks.installed():
        hooks.arm(mb["weight"][:, :-1], mb["z0"][:, :, :-1], 1.0)
        with pytest.raises(ValueError, match=r"layer 0 input is \(3, 13, 64\).*armed weight is \(3, 12\)"):
            model(**packing.forward_kwargs(mb, varlen_kwargs=False), use_cache=False)


def test_arm_refuses_inputs_the_kernels_cannot_take():
    model = load_model("tiny").model.train()
    mb = micro_batch("padded")
    hooks = ProConHooks(model, LAYERS, directions())
    with pytest.raises(TypeError, match="weight must be a bool or float tensor and z0 a float tensor, got torch.int64"):
        hooks.arm(mb["weight"].long(), mb["z0"], 1.0)
    with pytest.raises(TypeError, match="got torch.bool and torch.int64"):
        hooks.arm(mb["weight"], mb["z0"].long(), 1.0)
    with pytest.raises(ValueError, match="z0 is on meta but the directions are on cpu"):
        hooks.arm(mb["weight"], mb["z0"].to("meta"), 1.0)
