"""Gradients for every argument that requires them, double backward, and the direction's
normalisation at extreme magnitudes, for every backend (triton under the interpreter)."""
import pytest
import torch
from test_penalty import make_inputs

from fastprocon import anchor_projection, procon_penalty
from fastprocon.penalty.ops import NORMS

FUSED = ["torch", pytest.param("triton", id="triton-interpreted")]
ALL = FUSED + ["reference"]


def learnable(shape=(6, 9), seed=3, dtype=torch.float64):
    """hidden, direction, reference, float weight and a 0-d scale, all leaves requiring grad."""
    hidden, direction, reference, weight = make_inputs(shape, dtype, seed=seed, weight="float")
    scale = torch.tensor(0.8, dtype=torch.float64)
    return [t.to(torch.float64).requires_grad_() for t in (hidden, direction, reference, weight, scale)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm", list(NORMS))
def test_gradcheck_every_argument(backend, norm):
    def penalty(h, r, z0, w, s):
        return procon_penalty(h, r, z0, w, norm=norm, scale=s, backend=backend)

    # fast_mode (a random projection of the Jacobian) for the slow interpreter: still sees any
    # dropped or wrong gradient of any argument
    assert torch.autograd.gradcheck(penalty, tuple(learnable()), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm", list(NORMS))
def test_injection_gradients_of_every_argument(backend, norm):
    """anchor_projection's backward gives (downstream + penalty)'s gradient for all five arguments."""
    upstream = torch.randn(4, 5, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for form in ("injection", "reference"):
        args = learnable((4, 5, 9), seed=8)
        if form == "injection":
            out, _ = anchor_projection(*args[:4], norm=norm, scale=args[4], backend=backend)
            (out * upstream).sum().backward()
        else:
            loss = procon_penalty(*args[:4], norm=norm, scale=args[4], backend="reference")
            ((args[0] * upstream).sum() + loss).backward()
        results.append([a.grad for a in args])
    for name, fast, truth in zip(("hidden", "direction", "reference", "weight", "scale"), *results):
        torch.testing.assert_close(fast, truth, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm", list(NORMS))
def test_gradgradcheck(backend, norm):
    h, r, z0, w, s = learnable()

    def penalty(h, z0, w, s):
        return procon_penalty(h, r.detach(), z0, w, norm=norm, scale=s, backend=backend)

    assert torch.autograd.gradgradcheck(penalty, (h, z0, w, s), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm", list(NORMS))
def test_gradient_penalty_second_backward(backend, norm):
    """loss = p(h) + |dp/dh|^2 (a gradient penalty) backpropagated: h.grad must include the
    second-order term (exactly zero only for l1), as the reference backend's autograd has it."""
    grads = {}
    for b in (backend, "reference"):
        hidden, direction, reference, weight = make_inputs((3, 7, 10), torch.float32, seed=4, weight="float")
        h = hidden.double().requires_grad_()
        z0 = reference.double().requires_grad_()
        p = procon_penalty(h, direction.double(), z0, weight.double(), norm=norm, scale=0.3, backend=b)
        (g,) = torch.autograd.grad(p, h, create_graph=True)
        (p + 2.0 * (g * g).sum() + (g * h).sum()).backward()
        grads[b] = (h.grad, z0.grad)
    torch.testing.assert_close(grads[backend], grads["reference"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_refusals(backend):
    h, r, z0, w, s = learnable()
    loss = procon_penalty(h, r, z0, w, norm="l2sq", backend=backend)
    with pytest.raises(RuntimeError, match=r"procon_penalty: double backward .*direction that requires grad"):
        torch.autograd.grad(loss, h, create_graph=True)
    out, _ = anchor_projection(h, r.detach(), z0, w, backend=backend)
    with pytest.raises(RuntimeError, match=r"anchor_projection: double backward .*use procon_penalty"):
        torch.autograd.grad(out.sum(), h, create_graph=True)


def _extreme_directions():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(33, generator=g, dtype=torch.float64)
    mixed = base.clone()
    mixed[::2] *= 1e20
    mixed[1::2] *= 1e-30
    return {"1e20": (base * 1e20).float(), "1e-30": (base * 1e-30).float(), "mixed": mixed.float(),
            "fp64 1e300": base * 1e300, "fp64 1e-300": base * 1e-300}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", list(_extreme_directions()))
def test_extreme_direction_magnitudes(backend, kind):
    """Any finite non-zero direction: same loss and hidden gradient as the same direction
    brought to unit scale in float64, and dL/d(direction) scaled by 1 / its magnitude."""
    direction = _extreme_directions()[kind]
    k = direction.abs().max().item()
    well_scaled = (direction.double() / k).float()
    hidden, _, reference, weight = make_inputs((21, 33), torch.float32, seed=2)
    results = []
    for d in (direction, well_scaled):
        h, r = hidden.clone().requires_grad_(), d.clone().requires_grad_()
        loss = procon_penalty(h, r, reference, weight, norm="huber", backend=backend)
        out, value = anchor_projection(h, r, reference, weight, norm="huber", backend=backend)
        (loss + out.sum()).backward()
        results.append((loss, value, h.grad, r.grad.double() * (k if d is direction else 1.0)))
    for name, got, want in zip(("loss", "value", "hidden.grad", "direction.grad * |direction|"), *results):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", FUSED)
def test_saves_only_vectors_with_every_argument_learnable(backend):
    args = learnable((64, 48), dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = procon_penalty(*args[:4], scale=args[4], backend=backend)
        out, _ = anchor_projection(*args[:4], scale=args[4], backend=backend)
    assert saved and max(saved) <= 64, saved
    (loss + out.sum()).backward()
    assert all(a.grad is not None for a in args)


def test_compiled_learnable_arguments():
    """aot_eager traces the backward of every argument (fullgraph) and matches eager."""
    args = learnable((2, 9, 16), dtype=torch.float32)

    def step(h, r, z0, w, s):
        out, _ = anchor_projection(h, r, z0, w, scale=s, backend="torch", validate=False)
        return procon_penalty(h, r, z0, w, norm="l2sq", scale=s, backend="torch", validate=False) + out.sin().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(step(*args), args)
    traced = torch.autograd.grad(compiled(*args), args)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_band_gradient_is_exactly_zero_at_the_anchor(backend, dtype):
    """z0 = z plus rounding-sized noise (the anchor at the initial weights): inside the band the
    penalty and its gradient are exactly 0 in both forms (the injection adds nothing to the
    upstream gradient); l1's gradient there is sign(noise) r, of full size."""
    hidden, direction, _, weight = make_inputs((5, 7, 33), dtype, seed=6)
    z = hidden.double() @ (direction.double() / direction.double().norm())
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-4
    z0 = (z + noise).float()
    upstream = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    for norm, delta in (("band", 1e-2), ("band", torch.tensor(1e-2)), ("l1", 1e-2)):
        h = hidden.clone().requires_grad_()
        loss = procon_penalty(h, direction, z0, weight, norm=norm, delta=delta, scale=0.7, backend=backend)
        (grad,) = torch.autograd.grad(loss, h)
        h = hidden.clone().requires_grad_()
        out, value = anchor_projection(h, direction, z0, weight, norm=norm, delta=delta, scale=0.7, backend=backend)
        (injected,) = torch.autograd.grad(out, h, upstream)
        if norm == "band":
            assert loss.item() == 0.0 and value.item() == 0.0
            assert torch.equal(grad, torch.zeros_like(grad)), "band: non-zero gradient at the anchor"
            assert torch.equal(injected, upstream), "band: the injection changed the upstream gradient"
        else:
            assert grad.abs().amax() > 0.1 and not torch.equal(injected, upstream)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("norm", ["huber", "band"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_delta_equals_float_delta(backend, norm, dtype):
    """A 0-d tensor delta (the hooks' per-layer width, no host sync) gives the float's values and
    gradients in every argument, in both forms."""
    results = []
    for delta in (0.75, torch.tensor(0.75)):
        args = [a.detach().to(dtype).requires_grad_() for a in learnable((4, 5, 9), seed=8)]
        loss = procon_penalty(*args[:4], norm=norm, delta=delta, scale=args[4], backend=backend)
        out, value = anchor_projection(*args[:4], norm=norm, delta=delta, scale=args[4], backend=backend)
        (loss + out.sin().sum()).backward()
        results.append([loss, value] + [a.grad for a in args])
    for got, want in zip(*results):
        assert torch.equal(got, want)
