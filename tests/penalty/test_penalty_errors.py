"""Every bad input to the penalty API gets a clear error naming the argument and what is wrong."""
import pytest
import torch

from fastprocon import ProConPenalty, anchor_projection, procon_penalty

H = torch.randn(5, 8)
R = torch.randn(8)


@pytest.mark.parametrize("fn", [procon_penalty, lambda *a, **k: anchor_projection(*a, **k)[1]])
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(direction=torch.randn(7)), ValueError, r"direction must have shape \[8\].*\(7,\)"),
    (dict(direction=torch.randn(8, 1)), ValueError, r"direction must have shape"),
    (dict(hidden=torch.randn(8)), ValueError, r"hidden must be \[N, D\] or \[B, T, D\], got shape \(8,\)"),
    (dict(hidden=torch.randn(1, 2, 3, 8)), ValueError, r"hidden must be"),
    (dict(reference=torch.randn(4)), ValueError, r"reference must have shape \[5\].*got \(4,\)"),
    (dict(weight=torch.ones(5, 1)), ValueError, r"weight must have shape \[5\]"),
    (dict(hidden=torch.ones(5, 8, dtype=torch.int64)), TypeError,
     r"hidden must be a floating-point tensor, got dtype torch.int64"),
    (dict(hidden=torch.randn(5, 8, dtype=torch.complex64)), TypeError, r"hidden must be .*complex64"),
    (dict(direction=torch.ones(8, dtype=torch.int32)), TypeError, r"direction must be a floating-point"),
    (dict(reference=torch.ones(5, dtype=torch.int64)), TypeError, r"reference must be a floating-point"),
    (dict(weight=torch.ones(5, dtype=torch.int64)), TypeError, r"weight must be a floating-point or bool"),
    (dict(direction=torch.full((8,), float("nan"))), ValueError, r"direction has non-finite values"),
    (dict(direction=torch.zeros(8)), ValueError, r"direction is all zeros"),
    (dict(direction=torch.randn(8, device="meta")), ValueError, r"direction is on meta but hidden is on cpu"),
    (dict(norm="l2"), ValueError, r"unknown norm 'l2'"),
    (dict(backend="cuda"), ValueError, r"unknown backend 'cuda'"),
    (dict(delta=-0.5), ValueError, r"delta must be a finite number >= 0, got -0.5"),
    (dict(norm="huber", delta=0.0), ValueError, r"delta must be > 0 for norm='huber'"),
    (dict(norm="band", delta=float("inf")), ValueError, r"delta must be a finite number >= 0, got inf"),
    (dict(norm="band", delta=torch.ones(2)), ValueError, r"delta must be a Python number or a 0-d tensor, got shape"),
    (dict(norm="band", delta=torch.tensor(0.5, requires_grad=True)), ValueError, r"delta must not require grad"),
    (dict(norm="band", delta=torch.tensor(-0.5)), ValueError, r"delta must be a finite number >= 0.*tensor\(-0.5\)"),
    (dict(norm="huber", delta=torch.tensor(0.0)), ValueError, r"delta must be .*> 0 for norm='huber'"),
    (dict(norm="band", delta=torch.tensor(1, dtype=torch.int64)), TypeError, r"delta must be a floating-point"),
    (dict(norm="band", delta=torch.tensor(0.5, device="meta")), ValueError, r"delta is on meta but hidden is on cpu"),
    (dict(scale=torch.ones(2)), ValueError, r"scale must be a Python number or a 0-d tensor, got shape \(2,\)"),
    (dict(scale="0.1"), TypeError, r"scale must be a Python number"),
    (dict(hidden="not a tensor"), TypeError, r"hidden must be a torch.Tensor, got str"),
])
def test_bad_input(fn, kwargs, exc, match):
    kwargs = dict(kwargs)  # parametrize shares the dict between cases
    args = dict(hidden=H, direction=R, reference=None, weight=None)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(exc, match=match):
        fn(args["hidden"], args["direction"], args["reference"], args["weight"], **kwargs)


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors.*backend='torch'"):
        procon_penalty(H, R, backend="triton")


# The id marks the one case here that runs a kernel under Triton's interpreter: gpu_check.sh
# deselects it (-k "not interpreted"), since its CUDA counterpart is in tests/gpu/test_gpu.py.
@pytest.mark.parametrize("backend", ["torch", "reference", pytest.param("triton", id="triton-interpreted")])
def test_direction_is_normalised(backend):
    """A non-unit direction is normalised: scaling it changes nothing."""
    a = procon_penalty(H, R, backend=backend)
    b = procon_penalty(H, 10.0 * R, backend=backend)
    torch.testing.assert_close(a, b)


def test_module_form():
    module = ProConPenalty(R, norm="huber", delta=0.5)
    z0 = torch.randn(5)
    torch.testing.assert_close(module(H, z0, scale=2.0),
                               procon_penalty(H, R, z0, norm="huber", delta=0.5, scale=2.0))
    assert "D=8" in repr(module)
    band = ProConPenalty(R, norm="band", delta=torch.tensor(0.25))
    assert dict(band.named_buffers()).keys() == {"direction", "delta"}   # the width follows .to(device)
    torch.testing.assert_close(band(H, z0), procon_penalty(H, R, z0, norm="band", delta=0.25))


@pytest.mark.parametrize("kwargs,match", [
    (dict(direction=torch.zeros(8)), r"direction is all zeros"),
    (dict(direction=torch.full((8,), float("inf"))), r"direction has non-finite values"),
    (dict(direction=torch.randn(2, 8)), r"direction must be 1-D \[D\], got shape \(2, 8\)"),
    (dict(norm="l3"), r"unknown norm 'l3'"),
    (dict(norm="huber", delta=0.0), r"delta must be > 0 for norm='huber'"),
    (dict(norm="band", delta=torch.tensor(float("nan"))), r"delta must be a finite number >= 0"),
    (dict(backend="gpu"), r"unknown backend 'gpu'"),
])
def test_module_checks_everything_at_construction(kwargs, match):
    """The module's forward skips value checks (no host sync per call), so the constructor does them."""
    kwargs = dict(kwargs)
    direction = kwargs.pop("direction", R)
    with pytest.raises(ValueError, match=match):
        ProConPenalty(direction, **kwargs)
