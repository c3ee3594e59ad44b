"""Test-session setup. Triton's interpreter must be switched on before any module defining
@triton.jit kernels is imported, so the Triton backend runs on CPU tensors here."""
import os
import pathlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# tests/gpu needs a CUDA device and compiled Triton: benchmarks/gpu_check.sh runs it (FASTPROCON_GPU_TESTS=1)
collect_ignore = [] if os.environ.get("FASTPROCON_GPU_TESTS") == "1" else ["gpu"]

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
    """../shared/data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def second_step_gradients(cfg):
    """A tiny-model Trainer on ``cfg``: one optimizer step, then step 2's gradients accumulated
    without stepping (works on one process or under torchrun).

    -> (CE/ProCon sums of step 2 summed over processes, full gradients by parameter name,
        micro-batches of step 2 on this process, packed rows of step 2 on this process)
    """
    import fastprocon.distributed as D
    from fastprocon.train import Trainer

    ctx = D.init_distributed("cpu")
    try:
        trainer = Trainer(cfg, ctx)
        with trainer.hooks.installed():
            trainer.step(0)
            trainer._reset_interval()
            trainer.accumulate_gradients(1)
        grads = {n.replace("._orig_mod", ""): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 .clone() for n, p in trainer.model.named_parameters()}
        result = (D.all_reduce_sum(trainer._acc.clone()), grads, len(trainer.batches.micro_batches(1)),
                  len(trainer.batches.rows(1)))
        del trainer                   # before the group goes (see D.shutdown)
    finally:
        D.shutdown(ctx)
    return result


def first_step_gradients(cfg):
    """A tiny-model Trainer on ``cfg``: step 1's gradients at the initial weights accumulated with
    the config's ProCon, then again with alpha 0 (CE only) on the same trainer and batches (works
    on one process or under torchrun).

    -> (ProCon sum of step 1 summed over processes, gradients with ProCon, gradients of CE alone,
        both full tensors by parameter name)
    """
    import fastprocon.distributed as D
    from fastprocon.train import Trainer

    def full_grads(model):
        return {n.replace("._orig_mod", ""): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                .clone() for n, p in model.named_parameters() if p.grad is not None}

    ctx = D.init_distributed("cpu")
    try:
        trainer = Trainer(cfg, ctx)
        with trainer.hooks.installed():
            trainer.accumulate_gradients(0)
            procon = D.all_reduce_sum(trainer._acc.clone())[1]
            with_procon = full_grads(trainer.model)
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer._reset_interval()
            trainer.alpha = lambda step: 0.0      # the same step, CE alone
            trainer.accumulate_gradients(0)
            ce_only = full_grads(trainer.model)
        del trainer                   # before the group goes (see D.shutdown)
    finally:
        D.shutdown(ctx)
    return procon, with_procon, ce_only
