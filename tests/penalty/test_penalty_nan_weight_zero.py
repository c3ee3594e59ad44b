"""A weight-0 token is excluded entirely: non-finite hidden states there (NaN, inf) change neither
the loss nor any gradient, in every backend (the Triton kernels under the interpreter) and in
both forms (procon_penalty, anchor_projection); a non-finite hidden state at a weighted token
still makes the loss non-finite."""
import pytest
import torch

from fastprocon import anchor_projection, procon_penalty, procon_penalty_ref

BACKENDS = ["torch", "triton", "reference"]


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 7, 40, generator=g).to(dtype)
    direction = torch.randn(40, generator=g, dtype=torch.float64).float()
    reference = torch.randn(2, 7, generator=g)
    weight = (torch.rand(2, 7, generator=g) > 0.4).float()
    weight[0, 1] = weight[1, 3] = weight[1, 6] = 0.0
    return hidden, direction, reference, weight


def poisoned(hidden, weight):
    """hidden with NaN / inf in rows of weight 0, and the same with those rows 0."""
    bad = hidden.clone()
    bad[0, 1, 3] = float("nan")
    bad[1, 3] = float("inf")
    bad[1, 6, :5] = float("-inf")
    clean = hidden.masked_fill((weight == 0)[..., None], 0)
    return bad, clean


def penalty(backend, hidden, direction, reference, weight, norm):
    hidden = hidden.clone().requires_grad_()
    direction = direction.clone().requires_grad_()
    reference = reference.clone().requires_grad_()
    if backend == "reference":
        loss, _ = procon_penalty_ref(hidden, direction, reference, weight, norm=norm, scale=0.5)
    else:
        loss = procon_penalty(hidden, direction, reference, weight, norm=norm, scale=0.5, backend=backend)
    loss.backward()
    return loss.detach(), hidden.grad, direction.grad, reference.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["l1", "l2sq", "huber"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_hidden_states_at_weight_zero_tokens_change_nothing(backend, norm, dtype):
    hidden, direction, reference, weight = inputs(dtype)
    bad, clean = poisoned(hidden, weight)
    got = penalty(backend, bad, direction, reference, weight, norm)
    want = penalty(backend, clean, direction, reference, weight, norm)
    assert torch.isfinite(got[0]) and all(torch.isfinite(t).all() for t in got[1:])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_anchor_projection_excludes_them_too(backend):
    hidden, direction, reference, weight = inputs(torch.float32, seed=1)
    bad, clean = poisoned(hidden, weight)
    results = []
    for h in (bad, clean):
        h = h.clone().requires_grad_()
        d = direction.clone().requires_grad_()
        out, value = anchor_projection(h, d, reference, weight, scale=0.3, backend=backend)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        out.backward(grad_out.masked_fill(~torch.isfinite(h.detach()), 0))
        results.append((value.detach(), h.grad.masked_fill((weight == 0)[..., None], 0), d.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(results[0][0]) and torch.isfinite(results[0][2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_at_a_weighted_token_still_shows(backend):
    hidden, direction, reference, weight = inputs(torch.float32)
    hidden[0, 0, 0] = float("nan")
    weight[0, 0] = 1.0
    loss = penalty(backend, hidden, direction, reference, weight, "l1")[0]
    assert torch.isnan(loss)
