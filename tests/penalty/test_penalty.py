"""The fused penalty against a float64 reference, for every backend, dtype, norm and odd shape.

Accuracy rule (flash-attn's): a fast path's error against float64 is at most twice the error of
plain PyTorch computing the same thing in the input dtype, plus a tiny atol.
"""
import pytest
import torch

from fastprocon import anchor_projection, procon_penalty
from fastprocon.penalty.ops import NORMS, psi_and_grad

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["triton", "torch", "reference"]
DELTA = 1.0


def make_inputs(shape, dtype, seed=0, weight="bool", strided=False):
    """Random hidden [*lead, D], direction, weight and z0 placed 0.2-0.6 or 1.4-2.0 away from the
    exact projection, so no kink (|.|'s at 0, Huber's and the band's at DELTA) sits within rounding error."""
    g = torch.Generator().manual_seed(seed)
    *lead, D = shape
    if strided:  # rows with a stride of 2 D, last dim contiguous
        hidden = torch.randn(*lead, 2 * D, generator=g)[..., :D]
    else:
        hidden = torch.randn(*shape, generator=g)
    hidden = hidden.to(dtype)
    direction = torch.randn(D, generator=g) * 3.0  # deliberately not unit length
    r = direction.double() / direction.double().norm()
    z = hidden.double() @ r
    near = torch.rand(lead, generator=g, dtype=torch.float64) * 0.4 + 0.2
    far = torch.rand(lead, generator=g, dtype=torch.float64) * 0.6 + 1.4
    offset = torch.where(torch.rand(lead, generator=g) < 0.5, near, far)
    sign = torch.where(torch.rand(lead, generator=g) < 0.5, -1.0, 1.0).double()
    reference = (z + sign * offset).float()
    if weight == "bool":
        w = torch.rand(lead, generator=g) < 0.7
    elif weight == "zero":
        w = torch.zeros(lead)
    else:
        w = torch.rand(lead, generator=g)
    return hidden, direction, reference, w


def plain_same_dtype(hidden, direction, reference, weight, norm, scale):
    """Naive PyTorch entirely in hidden's dtype: the error yardstick."""
    dt = hidden.dtype
    h = hidden.detach().clone().requires_grad_()
    r = direction.to(dt) / direction.to(dt).norm()
    z = h @ r
    psi, _ = psi_and_grad(z - reference.to(dt), NORMS[norm], DELTA)
    loss = scale * (psi * weight.to(dt)).sum()
    return loss, z, h


def err(x, truth):
    return (x.double() - truth.double()).abs().max().item()


def assert_close_to_truth(name, fast, plain, truth):
    bound = 2 * err(plain, truth) + 1e-6 * (1 + truth.abs().max().item())
    assert err(fast, truth) <= bound, f"{name}: error {err(fast, truth):.3g} > bound {bound:.3g}"


SHAPES = [(1, 1), (1, 576), (7, 100), (300, 576), (2, 37, 100), (513, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, dtype, norm, shape):
    hidden, direction, reference, weight = make_inputs(shape, dtype, seed=len(shape) * 1000 + shape[-1])
    scale, upstream = 0.37, torch.tensor(-1.7)

    truth_h = hidden.double().requires_grad_()
    truth_loss, truth_z = procon_penalty(truth_h, direction.double(), reference, weight, norm=norm, delta=DELTA,
                                         scale=scale, backend="reference", return_projection=True)
    truth_loss.backward(upstream.double())

    plain_loss, plain_z, plain_h = plain_same_dtype(hidden, direction, reference, weight, norm, scale)
    plain_loss.backward(upstream.to(dtype))

    h = hidden.clone().requires_grad_()
    loss, z = procon_penalty(h, direction, reference, weight, norm=norm, delta=DELTA, scale=scale,
                             backend=backend, return_projection=True)
    loss.backward(upstream.to(loss.dtype))

    assert loss.shape == () and loss.dtype == torch.float32
    assert z.shape == hidden.shape[:-1] and z.dtype == torch.float32
    assert h.grad.dtype == dtype and h.grad.shape == hidden.shape
    assert_close_to_truth("loss", loss, plain_loss, truth_loss)
    assert_close_to_truth("z", z, plain_z, truth_z)
    assert_close_to_truth("grad", h.grad, plain_h.grad, truth_h.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["zero_weights", "float_weights", "strided", "transposed", "no_ref_no_weight"])
def test_special_inputs(backend, case):
    dtype = torch.bfloat16
    weight_kind = {"zero_weights": "zero", "float_weights": "float"}.get(case, "bool")
    hidden, direction, reference, weight = make_inputs((67, 96), dtype, seed=7, weight=weight_kind,
                                                       strided=case == "strided")
    if case == "transposed":  # last dim not contiguous: the fused paths copy, results unchanged
        hidden = hidden.t().contiguous().t()
        assert hidden.stride(-1) != 1
    if case == "no_ref_no_weight":
        reference = weight = None
    truth_h = hidden.double().requires_grad_()
    truth = procon_penalty(truth_h, direction.double(), reference, weight, backend="reference")
    truth.backward()
    ref_plain = torch.zeros(hidden.shape[0]) if reference is None else reference
    w_plain = torch.ones(hidden.shape[0]) if weight is None else weight
    plain_loss, _, plain_h = plain_same_dtype(hidden, direction, ref_plain, w_plain, "l1", 1.0)
    plain_loss.backward()
    h = hidden.clone().requires_grad_() if case != "strided" else hidden.requires_grad_()
    loss = procon_penalty(h, direction, reference, weight, backend=backend)
    loss.backward()
    assert_close_to_truth("loss", loss, plain_loss, truth)
    assert_close_to_truth("grad", h.grad, plain_h.grad, truth_h.grad)
    if case == "zero_weights":
        assert loss.item() == 0.0 and not h.grad.any()


def central_difference_grad(f, h, eps=1e-6):
    """Numerical gradient of scalar f at h by central differences, element by element."""
    grad = torch.zeros_like(h)
    flat, gflat = h.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        orig = flat[i].item()
        flat[i] = orig + eps
        hi = f(h).item()
        flat[i] = orig - eps
        lo = f(h).item()
        flat[i] = orig
        gflat[i] = (hi - lo) / (2 * eps)
    return grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_gradcheck_float64(backend, norm):
    hidden, direction, reference, weight = make_inputs((6, 9), torch.float64, seed=3, weight="float")
    scale = torch.tensor(0.8, dtype=torch.float64)

    def penalty(h):
        return procon_penalty(h, direction, reference, weight, norm=norm, scale=scale, backend=backend)

    assert torch.autograd.gradcheck(penalty, (hidden.clone().requires_grad_(),))

    # The injection form adds the penalty's gradient whatever the upstream gradient is (it stands
    # for "downstream loss + penalty", backpropagated with gradient 1), so torch's gradcheck,
    # which also backpropagates zeros, does not apply; check against central differences instead.
    def injected(h):
        out, value = anchor_projection(h, direction, reference, weight, norm=norm, scale=scale, backend=backend)
        return (out.sin() * 1.3).sum() + value

    h = hidden.clone().requires_grad_()
    injected(h).backward()
    with torch.no_grad():
        numerical = central_difference_grad(injected, hidden.clone())
    torch.testing.assert_close(h.grad, numerical, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_injection_matches_penalty_plus_autograd(backend, dtype):
    hidden, direction, reference, weight = make_inputs((3, 41, 100), dtype, seed=11)
    scale = torch.tensor(0.25)
    upstream = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    h1 = hidden.clone().requires_grad_()
    out, penalty = anchor_projection(h1, direction, reference, weight, scale=scale, backend=backend)
    assert out.shape == hidden.shape and torch.equal(out, hidden)
    assert not penalty.requires_grad
    (out * upstream).sum().backward()

    truth_h = hidden.double().requires_grad_()
    truth = procon_penalty(truth_h, direction.double(), reference, weight, scale=scale.double(), backend="reference")
    ((truth_h * upstream.double()).sum() + truth).backward()

    pl, _, ph = plain_same_dtype(hidden, direction, reference, weight, "l1", 0.25)
    ((ph * upstream).sum() + pl).backward()

    assert_close_to_truth("penalty", penalty, pl, truth)
    assert_close_to_truth("grad", h1.grad, ph.grad, truth_h.grad)
    fused = procon_penalty(hidden, direction, reference, weight, scale=scale, backend=backend)
    torch.testing.assert_close(penalty, fused.detach())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bitwise_deterministic(backend):
    hidden, direction, reference, weight = make_inputs((1000, 200), torch.bfloat16, seed=5)
    upstream = torch.randn(hidden.shape).bfloat16()
    results = []
    for _ in range(2):
        h = hidden.clone().requires_grad_()
        loss = procon_penalty(h, direction, reference, weight, backend=backend)
        out, pen = anchor_projection(h, direction, reference, weight, backend=backend)
        (loss + (out * upstream).sum()).backward()
        results.append((loss.detach(), pen, h.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_saves_only_vectors_for_backward(backend):
    """The gradient is rank one: nothing N x D may be kept alive between forward and backward."""
    hidden, direction, reference, weight = make_inputs((64, 48), torch.float32, seed=2)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    h = hidden.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = procon_penalty(h, direction, reference, weight, backend=backend)
        out, _ = anchor_projection(h, direction, reference, weight, backend=backend)
    assert saved and max(saved) <= max(hidden.shape), saved
    (loss + out.sum()).backward()


# The Triton backend is traced by dynamo here (fullgraph: no graph breaks); AOT tracing of its
# kernels needs a real GPU (the interpreter cannot run under functionalization), so
# benchmarks/gpu_check.sh covers inductor + Triton on CUDA.
@pytest.mark.parametrize("backend,compiler", [("torch", "aot_eager"), ("triton", "eager")])
@pytest.mark.parametrize("form", ["penalty", "injection"])
def test_compiled_matches_eager(backend, compiler, form):
    hidden, direction, reference, weight = make_inputs((2, 19, 64), torch.float32, seed=9)
    direction = direction / direction.norm()
    upstream = torch.randn(hidden.shape)

    def step(h, scale):
        if form == "penalty":
            return procon_penalty(h, direction, reference, weight, scale=scale, backend=backend, validate=False)
        out, penalty = anchor_projection(h, direction, reference, weight, scale=scale, backend=backend,
                                         validate=False)
        return (out * upstream).sum() + 0 * penalty

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    scale = torch.tensor(0.5)
    h_eager, h_comp = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    step(h_eager, scale).backward()
    loss_c = compiled(h_comp, scale)
    loss_c.backward()
    torch.testing.assert_close(loss_c, step(hidden, scale))
    torch.testing.assert_close(h_comp.grad, h_eager.grad)


def test_compiled_inductor_torch_backend():
    """The CPU runtime path under the real compiler (inductor), fullgraph, forward and backward."""
    hidden, direction, reference, weight = make_inputs((33, 64), torch.float32, seed=4)

    def step(h):
        return procon_penalty(h, direction, reference, weight, scale=0.5, backend="torch", validate=False)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    step(h1).backward()
    loss = compiled(h2)
    loss.backward()
    torch.testing.assert_close(loss, step(hidden))
    torch.testing.assert_close(h2.grad, h1.grad)
