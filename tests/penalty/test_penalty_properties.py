"""Seeded random search over the penalty API against the float64 reference.

Each case draws a shape (odd sizes, 2-D or 3-D, empty now and then), a memory layout for hidden
(contiguous, padded rows, transposed, every other row of a 3-D tensor, a broadcast row), dtypes,
norm and delta, a mask (None, bool, float with zeros), a reference (None or a tensor, sometimes
non-contiguous), a scale (number, fp32 or fp64 0-d tensor), which of hidden, direction,
reference, weight and scale require grad, the form (procon_penalty or anchor_projection) and a
backend (torch, reference, and triton under the interpreter at small sizes). Every value and
every gradient is compared with the same computation on float64 copies through the reference
backend, within twice the error of plain PyTorch in the input dtype (tests/penalty/test_penalty.py).
"""
import random

import pytest
import torch
from test_penalty import assert_close_to_truth as close_when_nonempty

from fastprocon import anchor_projection, procon_penalty
from fastprocon.penalty.ops import NORMS, psi_and_grad

N_CASES = 300
HIDDEN_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS_2D = ["contiguous", "padded_rows", "transposed", "broadcast_row"]
LAYOUTS_3D = ["contiguous", "padded_rows", "every_other_row"]


def assert_close_to_truth(name, fast, plain, truth):
    assert fast.shape == truth.shape, (name, fast.shape, truth.shape)
    if truth.numel():
        close_when_nonempty(name, fast, plain, truth)


def draw(seed: int) -> dict:
    rng = random.Random(seed)
    three_d = rng.random() < 0.4
    d = rng.choice([1, 2, 3, 5, 17, 64, 100, 129])
    lead = [rng.choice([0, 1, 2, 3]), rng.choice([1, 7, 13, 31])] if three_d else \
        [rng.choice([0, 1, 2, 5, 33, 97, 257])]
    n = lead[0] * lead[-1] if three_d else lead[0]
    layout = rng.choice(LAYOUTS_3D if three_d else LAYOUTS_2D)
    backends = ["torch", "reference"] + (["triton"] if n * d <= 4096 else [])
    has_ref, weight = rng.random() < 0.7, rng.choice([None, "bool", "float"])
    scale = rng.choice(["number", torch.float32, torch.float64])
    case = dict(
        seed=seed, lead=lead, d=d, dtype=rng.choice(HIDDEN_DTYPES),
        layout="contiguous" if layout == "broadcast_row" and n == 0 else layout,
        norm=rng.choice([norm for norm in NORMS if norm != "band"]),
        delta=rng.choice([0.5, 1.0, 2.0]), dir_dtype=rng.choice([torch.float32, torch.float64, torch.bfloat16]),
        dir_scale=10.0 ** rng.uniform(-2, 2), has_ref=has_ref,
        ref_dtype=rng.choice([torch.float32, torch.bfloat16, torch.float64]), weight=weight,
        w_dtype=rng.choice([torch.float32, torch.float16]), aux_transposed=three_d and rng.random() < 0.3,
        scale=scale, form=rng.choice(["penalty", "injection"]), backend=rng.choice(backends),
        grad_h=rng.random() < 0.8, grad_r=rng.random() < 0.3, grad_ref=has_ref and rng.random() < 0.4,
        grad_w=weight == "float" and rng.random() < 0.4, grad_scale=scale != "number" and rng.random() < 0.4)
    # the band is drawn last: a quarter of the cases, the other fields of every seed's case as they are
    if rng.random() < 0.25:
        case["norm"] = "band"
    return case


def leading(t, transposed):
    """A [*lead] tensor, from a transposed buffer when asked (a non-contiguous 3-D argument)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1) if transposed else t


def build(case: dict) -> dict:
    """Base values (float64, or bool), away from the kinks of |.| (0), Huber and the band (+-delta)."""
    g = torch.Generator().manual_seed(case["seed"])
    lead, d, delta = case["lead"], case["d"], case["delta"]
    rows = 1 if case["layout"] == "broadcast_row" else None
    base = torch.randn(*(lead if rows is None else [rows]), d, generator=g, dtype=torch.float64)
    direction = torch.randn(d, generator=g, dtype=torch.float64) * case["dir_scale"]
    direction = direction.to(case["dir_dtype"]).double()
    r = direction / direction.norm()
    near = torch.rand(lead, generator=g, dtype=torch.float64) * 0.4 + 0.2
    far = torch.rand(lead, generator=g, dtype=torch.float64) * 0.6 + 1.4
    target = torch.where(torch.rand(lead, generator=g) < 0.5, near, far) * delta
    target = target * torch.where(torch.rand(lead, generator=g) < 0.5, -1.0, 1.0).double()
    if case["has_ref"]:
        hidden = base.to(case["dtype"]).double()
        z = (hidden @ r).expand(lead) if rows else hidden @ r
        reference = (z - target).to(case["ref_dtype"]).double()
    else:  # move each row along r so that z itself sits at the target
        if rows:  # one row, seen N times
            base = base + (target.reshape(-1)[:1, None] - base @ r[:, None]) * r
        else:
            base = base + (target - base @ r)[..., None] * r
        hidden, reference = base.to(case["dtype"]).double(), None
    weight = None
    if case["weight"] == "bool":
        weight = torch.rand(lead, generator=g) < 0.7
    elif case["weight"] == "float":
        weight = torch.rand(lead, generator=g, dtype=torch.float64) * (torch.rand(lead, generator=g) < 0.8)
        weight = weight.to(case["w_dtype"]).double()
    scale = 0.37 if case["scale"] == "number" else torch.tensor(0.37, dtype=torch.float64).to(case["scale"]).double()
    upstream = torch.randn(lead + [d], generator=g, dtype=torch.float64).to(case["dtype"]).double() \
        if case["form"] == "injection" else torch.tensor(-1.7)
    return dict(hidden=hidden, direction=direction, reference=reference, weight=weight, scale=scale,
                upstream=upstream)


def lay_out(leaf, case):
    """hidden [*lead, D] from its leaf, in the case's memory layout."""
    layout, lead, d = case["layout"], case["lead"], case["d"]
    if layout == "padded_rows":
        return leaf[..., :d]
    if layout == "transposed":
        return leaf.t()
    if layout == "every_other_row":
        return leaf[:, ::2]
    if layout == "broadcast_row":
        return leaf.expand(*lead, d)
    return leaf


def hidden_leaf(values, case, dtype):
    layout = case["layout"]
    if layout == "padded_rows":
        values = torch.cat([values, torch.zeros_like(values[..., :3])], dim=-1)
    elif layout == "transposed":
        values = values.t().contiguous()
    elif layout == "every_other_row":
        values = torch.stack([values, torch.zeros_like(values)], dim=2).flatten(1, 2)
    return values.to(dtype, copy=True).requires_grad_(case["grad_h"])


def run(case: dict, vals: dict, mode: str):
    """The case through `mode`: "fast" (the case's backend, the inputs' own dtypes), "truth"
    (reference backend on float64 copies) or "plain" (naive PyTorch in hidden's dtype).
    Returns (penalty value, z or None, {argument: gradient})."""
    wide = mode == "truth"

    def leaf(t, dtype, grad):
        if t is None or isinstance(t, float):
            return t
        if t.dtype == torch.bool:
            return t
        return t.to(torch.float64 if wide else dtype, copy=True).requires_grad_(grad)

    leaves = dict(hidden=hidden_leaf(vals["hidden"], case, torch.float64 if wide else case["dtype"]),
                  direction=leaf(vals["direction"], case["dir_dtype"], case["grad_r"]),
                  reference=leaf(vals["reference"], case["ref_dtype"], case["grad_ref"]),
                  weight=leaf(vals["weight"], case["w_dtype"], case["grad_w"]),
                  scale=leaf(vals["scale"], case["scale"] if case["scale"] != "number" else None, case["grad_scale"]))
    h = lay_out(leaves["hidden"], case)
    reference, weight = (None if t is None else leading(t, case["aux_transposed"])
                         for t in (leaves["reference"], leaves["weight"]))
    args = dict(norm=case["norm"], delta=case["delta"], scale=leaves["scale"])
    z = None
    if mode == "plain":
        dt = case["dtype"]
        r = leaves["direction"].to(dt)
        z = h @ (r / r.norm())
        diff = z - reference.to(dt) if reference is not None else z
        psi, _ = psi_and_grad(diff, NORMS[case["norm"]], case["delta"])
        value = (psi * weight.to(dt) if weight is not None else psi).sum() * leaves["scale"]
        total = value if case["form"] == "penalty" else (h * vals["upstream"].to(dt)).sum() + value
    elif case["form"] == "penalty" or mode == "truth":
        backend = "reference" if wide else case["backend"]
        value, z = procon_penalty(h, leaves["direction"], reference, weight, backend=backend,
                                  return_projection=True, **args)
        total = value if case["form"] == "penalty" else (h * vals["upstream"]).sum() + value
    else:
        out, value = anchor_projection(h, leaves["direction"], reference, weight, backend=case["backend"], **args)
        assert out.shape == h.shape and torch.equal(out, h)
        total = (out * vals["upstream"].to(out.dtype)).sum() if out.requires_grad else None
    grads = {}
    if total is not None and total.requires_grad:
        upstream = vals["upstream"].to(total.dtype) if case["form"] == "penalty" else torch.ones((), dtype=total.dtype)
        total.backward(upstream)
        grads = {k: t.grad for k, t in leaves.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    return value, z, grads


@pytest.mark.parametrize("block", range(N_CASES // 50))
def test_random_cases_match_float64(block):
    for seed in range(block * 50, (block + 1) * 50):
        case = draw(seed)
        vals = build(case)
        try:
            value, z, grads = run(case, vals, "fast")
            truth_value, truth_z, truth_grads = run(case, vals, "truth")
            plain_value, plain_z, plain_grads = run(case, vals, "plain")
            assert_close_to_truth("value", value, plain_value, truth_value)
            if z is not None:
                assert z.shape == tuple(case["lead"])
                assert_close_to_truth("z", z, plain_z, truth_z)
            assert grads.keys() == truth_grads.keys()
            for name, grad in grads.items():
                assert grad is not None, f"{name}.grad is None"
                assert grad.shape == truth_grads[name].shape, name
                assert_close_to_truth(f"{name}.grad", grad, plain_grads[name], truth_grads[name])
        except AssertionError as e:
            raise AssertionError(f"case {case}: {e}") from None
