"""int64 offsets: rows that start past 2**31 elements.

A [40000, 64] bf16 view with a row stride of 65536 puts its last row ~2.6e9 elements into a
~5 GB storage that is never touched except for the rows themselves, so this costs ~1 GB of RSS.
It runs in a subprocess: with 32-bit offsets the kernel would read out of bounds and crash.
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import torch
    from fastprocon import anchor_projection, procon_penalty
    D, N, stride = 64, 40000, 65536
    def strided_rows(seed):
        t = torch.empty_strided((N, D), (stride, 1), dtype=torch.bfloat16)
        t.copy_(torch.randn(N, D, generator=torch.Generator().manual_seed(seed)).bfloat16())
        return t
    h, gin = strided_rows(0), strided_rows(1)
    r = torch.randn(D, generator=torch.Generator().manual_seed(2))
    ref_loss, ref_z = procon_penalty(h.float(), r, backend="reference", return_projection=True)
    loss, z = procon_penalty(h, r, backend="triton", return_projection=True)
    h.requires_grad_()
    out, value = anchor_projection(h, r, backend="triton")
    out.backward(gin)
    expected = (gin.float() + torch.outer(torch.sign(ref_z), r / r.norm())).bfloat16()
    assert (z - ref_z).abs().max() < 1e-5, (z - ref_z).abs().max()
    assert torch.allclose(loss, ref_loss) and torch.allclose(value, ref_loss)
    # within one bf16 rounding of the expected gradient (r is normalised slightly differently)
    torch.testing.assert_close(h.grad.float(), expected.float(), rtol=2**-7, atol=1e-3)
    print("ok")
""")


def test_offsets_beyond_int32():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stdout, proc.stderr[-2000:])
