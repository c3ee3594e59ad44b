"""The fused penalty on CUDA with compiled Triton kernels (not the interpreter), and the
trainer's CUDA path. Run by benchmarks/gpu_check.sh; skipped without a GPU.

    TRITON_INTERPRET=0 FASTPROCON_GPU_TESTS=1 python -m pytest tests/gpu

The CPU suite does not collect this folder (tests/conftest.py), and there it would run under
Triton's interpreter, which tests/conftest.py switches on unless TRITON_INTERPRET is set.
The inputs, the same-dtype error yardstick and the accuracy rule (error against a
float64 reference at most 2x plain PyTorch's in the input dtype) are those of tests/penalty/test_penalty.py,
imported from there; here every tensor lives on the GPU.
"""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "penalty"))
from test_penalty import DELTA, DTYPES, SHAPES, assert_close_to_truth, make_inputs, plain_same_dtype  # noqa: E402

from fastprocon import anchor_projection, procon_penalty  # noqa: E402
from fastprocon.kernels import procon_projection as kernels  # noqa: E402
from fastprocon.penalty.ops import NORMS  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
GPU_SHAPES = SHAPES + [(4099, 2050), (3, 700, 576)]   # few distinct D: each compiles kernels


def to_cuda(*tensors):
    return [t.to(CUDA) if t is not None else None for t in tensors]


def test_triton_is_compiled_not_interpreted():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1" and not kernels.INTERPRET


@pytest.mark.parametrize("form", ["penalty", "injection"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_matches_float64(form, backend, dtype, norm, shape):
    hidden, direction, reference, weight = to_cuda(*make_inputs(shape, dtype, seed=len(shape) * 1000 + shape[-1]))
    scale = 0.37
    upstream = torch.randn(hidden.shape, device=CUDA, generator=torch.Generator(CUDA).manual_seed(1)).to(dtype)

    def downstream(h, loss):   # penalty form: loss alone; injection form: (h * upstream).sum() + loss
        return loss if form == "penalty" else (h * upstream.to(h.dtype)).sum() + loss

    truth_h = hidden.double().requires_grad_()
    truth_loss, truth_z = procon_penalty(truth_h, direction.double(), reference, weight, norm=norm, delta=DELTA,
                                         scale=scale, backend="reference", return_projection=True)
    downstream(truth_h, truth_loss).backward()
    plain_loss, plain_z, plain_h = plain_same_dtype(hidden, direction, reference, weight, norm, scale)
    downstream(plain_h, plain_loss).backward()

    h = hidden.clone().requires_grad_()
    if form == "penalty":
        loss, z = procon_penalty(h, direction, reference, weight, norm=norm, delta=DELTA, scale=scale,
                                 backend=backend, return_projection=True)
        loss.backward()
        assert_close_to_truth("z", z, plain_z, truth_z)
    else:
        out, loss = anchor_projection(h, direction, reference, weight, norm=norm, delta=DELTA, scale=scale,
                                      backend=backend)
        assert torch.equal(out, hidden)
        out.backward(upstream)
    assert loss.dtype == torch.float32 and h.grad.dtype == dtype
    assert_close_to_truth("loss", loss, plain_loss, truth_loss)
    assert_close_to_truth("grad", h.grad, plain_h.grad, truth_h.grad)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("shape", [(6, 9), (37, 576), (3, 2050)], ids=str)   # both fp64 tile regimes
def test_gradcheck_float64(norm, shape):
    hidden, direction, reference, weight = to_cuda(*make_inputs(shape, torch.float64, seed=3, weight="float"))
    scale = torch.tensor(0.8, dtype=torch.float64, device=CUDA)

    def penalty(h):
        return procon_penalty(h, direction, reference, weight, norm=norm, scale=scale, backend="triton")

    assert torch.autograd.gradcheck(penalty, (hidden.clone().requires_grad_(),))

    def every_argument(r, z0, w, s):   # the compiled H^T c reduction (a learnable direction)
        return procon_penalty(hidden, r, z0, w, norm=norm, scale=s, backend="triton")

    args = [t.clone().double().requires_grad_() for t in (direction, reference, weight, scale)]
    assert torch.autograd.gradcheck(every_argument, tuple(args))
    if norm != "l1":   # double backward on 4 rows (its numerical check perturbs every element)
        def four_rows(h):
            return procon_penalty(h, direction, reference[:4], weight[:4], norm=norm, backend="triton")

        assert torch.autograd.gradgradcheck(four_rows, (hidden[:4].clone().requires_grad_(),))


@pytest.mark.parametrize("shape", [(16384, 4096), (4099, 2050)], ids=str)
def test_bitwise_deterministic(shape):
    hidden, direction, reference, weight = to_cuda(*make_inputs(shape, torch.bfloat16, seed=5))
    upstream = torch.randn(hidden.shape, device=CUDA).bfloat16()
    results = []
    for _ in range(3):
        h = hidden.clone().requires_grad_()
        loss, z = procon_penalty(h, direction, reference, weight, return_projection=True)
        out, penalty = anchor_projection(h, direction, reference, weight)
        (loss + (out * upstream).sum()).backward()
        results.append((loss.detach(), z, penalty, h.grad))
    for first, other in zip(results[0], results[1]):
        assert torch.equal(first, other)
    for first, other in zip(results[0], results[2]):
        assert torch.equal(first, other)


def test_no_host_sync_in_the_hot_path():
    hidden, direction, reference, weight = to_cuda(*make_inputs((512, 576), torch.bfloat16, seed=3))
    upstream = torch.randn(hidden.shape, device=CUDA).bfloat16()
    scale = torch.tensor(0.5, device=CUDA)
    h = hidden.clone().requires_grad_()
    procon_penalty(h, direction, reference, weight, scale=scale, validate=False).backward()   # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = procon_penalty(h, direction, reference, weight, scale=scale, validate=False)
        out, _ = anchor_projection(h, direction, reference, weight, scale=scale, validate=False)
        (loss + (out * upstream).sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("form", ["penalty", "injection"])
def test_inductor_compiled_matches_eager(form, dtype=torch.bfloat16):
    hidden, direction, reference, weight = to_cuda(*make_inputs((2, 300, 576), dtype, seed=9))
    direction = direction / direction.norm()
    upstream = torch.randn(hidden.shape, device=CUDA).to(dtype)

    def step(h, scale):
        if form == "penalty":
            return procon_penalty(h, direction, reference, weight, scale=scale, validate=False)
        out, penalty = anchor_projection(h, direction, reference, weight, scale=scale, validate=False)
        return (out.float() * upstream.float()).sum() + penalty

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)      # inductor: the kernels inside the triton_op
    scale = torch.tensor(0.5, device=CUDA)
    h_eager, h_comp = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss_e = step(h_eager, scale)
    loss_e.backward()
    loss_c = compiled(h_comp, scale)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(h_comp.grad, h_eager.grad)


def test_int64_offsets_beyond_2_31_elements():
    """N x D > 2**31 in bf16 (~4.3 GB per N x D tensor): rows past the int32 range are right."""
    d = 4096
    n = 2**31 // d + 257
    need = 3 * n * d * 2 + (1 << 30)                     # H, upstream, gradient, slack
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    g = torch.Generator(CUDA).manual_seed(0)
    hidden = torch.randn(n, d, device=CUDA, dtype=torch.bfloat16, generator=g).requires_grad_()
    direction = torch.randn(d, device=CUDA, generator=g)
    reference = torch.randn(n, device=CUDA, generator=g)
    weight = torch.rand(n, device=CUDA, generator=g) < 0.5
    upstream = torch.randn(n, d, device=CUDA, dtype=torch.bfloat16, generator=g)
    loss, z = procon_penalty(hidden, direction, reference, weight, return_projection=True)
    out, penalty = anchor_projection(hidden, direction, reference, weight)
    out.backward(upstream)

    r = direction.double() / direction.double().norm()
    tail = slice(n - 300, n)                             # rows whose offsets need more than 31 bits
    z_tail = hidden[tail].detach().double() @ r
    torch.testing.assert_close(z[tail].double(), z_tail, rtol=0, atol=1e-3 * (1 + z_tail.abs().max().item()))
    truth = sum(((hidden[s].detach().double() @ r - reference[s].double()).abs() * weight[s]).sum()
                for s in (slice(i, min(i + 65536, n)) for i in range(0, n, 65536)))
    torch.testing.assert_close(loss.double(), truth, rtol=1e-4, atol=0)
    torch.testing.assert_close(penalty, loss.detach())
    c = torch.sign(z_tail - reference[tail].double()) * weight[tail].double()
    expect = upstream[tail].double() + c[:, None] * r[None, :]
    torch.testing.assert_close(hidden.grad[tail].double(), expect, rtol=0, atol=2e-2 * (1 + expect.abs().max().item()))


def test_trainer_on_cuda_bf16_with_resume(tmp_path, monkeypatch):
    """The trainer's CUDA path: FSDP2 on one GPU (nccl), bf16 mixed precision, the Triton
    kernels at every layer, a checkpoint and a resume. Step 1 (same weights) matches an fp32
    CPU run up to bf16 rounding."""
    from fastprocon.penalty import ops
    from fastprocon.train import load_config, train
    from fastprocon.train.metrics import read_metrics

    def run(run_dir, *extra):
        return train(load_config("tiny", [f"run_dir={run_dir}", "log_every=1", "checkpoint_every=2", *extra]))

    run(tmp_path / "cpu", "model.device=cpu", "max_steps=1", "export=false")
    assets = [f"procon.directions={tmp_path / 'cpu' / 'directions.safetensors'}",
              f"procon.reference_cache={tmp_path / 'cpu' / 'reference.safetensors'}"]
    launches = []
    fused = ops.BACKWARD["triton"]
    monkeypatch.setitem(ops.BACKWARD, "triton", lambda coef, *a: launches.append(coef.device) or fused(coef, *a))
    run(tmp_path / "cuda", "model.device=cuda", "max_steps=4", "export=false", *assets)
    result = run(tmp_path / "cuda", "model.device=cuda", "max_steps=6", "export=true", *assets)   # resumes at 4
    cpu, cuda = read_metrics(tmp_path / "cpu"), read_metrics(tmp_path / "cuda")
    assert [r["step"] for r in cuda] == [1, 2, 3, 4, 5, 6] and result.start_step == 4
    assert launches and all(d.type == "cuda" for d in launches)          # the Triton backward ran
    assert cuda[0]["ce"] == pytest.approx(cpu[0]["ce"], rel=5e-3)
    for r in cuda:
        assert all(map(math.isfinite, (r["ce"], r["procon"], r["grad_norm"]))) and r["mfu"] is not None
    assert (result.export_dir / "config.json").exists()


def test_inductor_layers_pass_the_start_up_compile_check_in_bf16(tmp_path):
    """The trainer's default CUDA set-up (compile on, bf16 mixed precision under FSDP2): inductor's
    compiled layers are within the stated tolerance of the eager layers, so compile stays on
    (model.compile = "on" would refuse, naming the difference, if they were not)."""
    import fastprocon.distributed as D
    from fastprocon.train import Trainer, load_config

    cfg = load_config("tiny", [f"run_dir={tmp_path}", "model.device=cuda", "compile=on", "mixed_precision=bf16",
                               "schedule=off", "max_steps=1", "export=false"])
    ctx = D.init_distributed("cuda")
    try:
        trainer = Trainer(cfg, ctx)
        assert trainer.compiled
        del trainer
    finally:
        D.shutdown(ctx)
