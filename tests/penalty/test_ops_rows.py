"""The fused ops take H [..., D] as its rows: the same bits as the flattened [N, D] H, forward and
backward, contiguous or not in the leading dims, and the same under the fake (meta) kernels."""
import pytest
import torch

from fastprocon.penalty import ops


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("leading", ["contiguous", "transposed"])
def test_ops_take_any_leading_shape(backend, dtype, leading):
    gen = torch.Generator().manual_seed(3)
    h3 = torch.randn(3, 5, 24, generator=gen).to(dtype)
    if leading == "transposed":   # [B, T, D] with B and T swapped in memory: rows are not one stride apart
        h3 = torch.randn(5, 3, 24, generator=gen).to(dtype).transpose(0, 1)
    r = torch.nn.functional.normalize(torch.randn(24, generator=gen), dim=0)
    z0, w = torch.randn(15, generator=gen), torch.rand(15, generator=gen) > 0.3
    flat = h3.reshape(-1, 24)
    got = ops.FORWARD[backend](h3, r, z0, w, ops.NORMS["l1"], 1.0, None, True, True)
    want = ops.FORWARD[backend](flat, r, z0, w, ops.NORMS["l1"], 1.0, None, True, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    g = torch.tensor(0.37)
    grad_in = torch.randn(3, 5, 24, generator=gen).to(dtype)
    out = ops.BACKWARD[backend](want[1], r, g, grad_in, dtype)
    assert out.shape == (3, 5, 24) and out.dtype == dtype
    assert torch.equal(out.reshape(-1, 24), ops.BACKWARD[backend](want[1], r, g, grad_in.reshape(-1, 24), dtype))
    with torch.device("meta"):   # the fake kernels give the shapes the real ones do
        fake = ops.FORWARD[backend](h3.to("meta"), r.to("meta"), None, None, 0, 1.0, None, True, True)
        assert [t.shape for t in fake] == [t.shape for t in got]
        assert ops.BACKWARD[backend](want[1].to("meta"), r.to("meta"), g.to("meta"), grad_in.to("meta"),
                                     dtype).shape == out.shape
