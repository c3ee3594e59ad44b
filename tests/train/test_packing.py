"""Sequence packing, the chunked cross entropy, compiled decoder layers and the FLOP count: a
packed row's logits equal each sample's own; packed, padded, chunked-CE, full-logits and
compiled steps give the same loss and gradients on tiny; chunked CE equals plain CE (float64
reference) with and without ignored positions; bad row sizes and inexact models are refused."""
import functools
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import second_step_gradients

import fastprocon.distributed as D
from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.data.tokenize import TokenizedExample, collate
from fastprocon.models.load import load_model
from fastprocon.train import Trainer, load_config, packing
from fastprocon.train.batches import StepBatches
from fastprocon.train.chunked_ce import HAS_LINEAR_CE, linear_ce_sum
from fastprocon.train.loss import shift_labels
from fastprocon.train.metrics import training_flops


def test_plan_rows_keeps_every_sample_once_within_capacity():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 50, (37,), generator=gen).tolist()
    rows = packing.plan_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(37))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 64) + 3          # first-fit decreasing is near the bound
    assert rows == packing.plan_rows(lengths, 64)
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than a row's 8"):
        packing.plan_rows([3, 9], 8)


def test_a_sample_longer_than_the_row_is_an_error_naming_it():
    examples = [TokenizedExample(f"d:{i}", [1] * n, [IGNORE_INDEX] + [1] * (n - 1)) for i, n in enumerate([4, 9, 12])]
    with pytest.raises(ValueError, match=r"example d:2 has 12 tokens, more than a packed row's 8 .*2 example"):
        StepBatches(examples, batch_size=2, micro_batch_size=1, world_size=1, rank=0, seed=0, pad_id=0,
                    tokens_per_row=8)


def random_samples(vocab, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3:]
        out.append(TokenizedExample(f"s:{i}", ids, labels))
    return out


def packed_row(samples):
    batch = collate(samples, 0)
    batch["targets"] = shift_labels(batch["labels"])
    return batch, packing.pack_collated(batch)


def test_packed_row_logits_equal_each_samples_own():
    model = load_model("tiny").model
    samples = random_samples(model.config.vocab_size, [7, 1, 12, 5])
    batch, row = packed_row(samples)
    assert row["position_ids"].tolist() == [list(range(7)) + [0] + list(range(12)) + list(range(5))]
    assert row["cu_seq_lens"].tolist() == [0, 7, 8, 20, 25] and row["max_length"] == 12
    # each sample's own targets: its last token predicts nothing (not the next sample's first token)
    assert row["targets"][0, [6, 7, 19, 24]].tolist() == [IGNORE_INDEX] * 4
    with torch.no_grad():
        packed = model(**packing.forward_kwargs(row, varlen_kwargs=False), use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0] for s in samples])
        padded = model(**packing.forward_kwargs(batch, varlen_kwargs=False), use_cache=False).logits
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[row["pack_mask"]], alone, rtol=1e-5, atol=1e-5)
    z = torch.randn(3, *batch["input_ids"].shape)        # z0 rows [L, n, T] follow the packed positions
    assert torch.equal(packing.pack_like(z, row["pack_mask"])[1, 0, 8:20], z[1, 2, :12])
    assert packing.check_packing_exact(model) is None


def test_packing_is_refused_or_turned_off_where_samples_would_leak(monkeypatch):
    model = load_model("tiny").model
    # without position_ids the model sees one long sequence: the probe must notice
    monkeypatch.setattr(packing, "forward_kwargs", lambda mb, varlen_kwargs: {"input_ids": mb["input_ids"]})
    why = packing.check_packing_exact(model)
    assert why is not None and "change each other's logits" in why
    with pytest.raises(ValueError, match="data.packing = 'on', but packed samples change"):
        packing.use_packing("on", model)
    assert packing.use_packing("auto", model)[0] is False
    assert packing.use_packing("off", model) == (False, None)


@pytest.mark.parametrize("use_torch", [pytest.param(None, marks=pytest.mark.skipif(
    not HAS_LINEAR_CE, reason="torch.nn.functional.linear_cross_entropy needs torch >= 2.13")), False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignored", [False, True])
def test_chunked_ce_equals_plain_ce(use_torch, dtype, ignored):
    """Loss and both gradients against a float64 reference: error at most 2x plain same-dtype CE's."""
    gen = torch.Generator().manual_seed(1)
    n, d, v = 53, 24, 301
    h64 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w64 = torch.randn(v, d, generator=gen, dtype=torch.float64) / 3
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignored:
        targets[torch.rand(n, generator=gen) < 0.4] = IGNORE_INDEX
    upstream = torch.rand((), generator=gen, dtype=torch.float64) + 0.5

    def run(fn, dt):
        h, w = (x.detach().to(dt).clone().requires_grad_() for x in (h64, w64))
        loss = fn(h, w)
        (loss * upstream.to(loss.dtype)).backward()
        return loss.double(), h.grad.double(), w.grad.double()

    def plain(h, w):
        return F.cross_entropy(F.linear(h, w).float() if h.dtype != torch.float64 else F.linear(h, w), targets,
                               ignore_index=IGNORE_INDEX, reduction="sum")

    ref = run(plain, torch.float64)
    base = run(plain, dtype)
    fast = run(lambda h, w: linear_ce_sum(h, w, targets, rows_per_chunk=8, use_torch=use_torch), dtype)
    for name, r, b, f in zip(("loss", "grad h", "grad w"), ref, base, fast):
        assert (f - r).abs().max() <= 2 * (b - r).abs().max() + 1e-5 * r.abs().max(), name


def test_training_flops_count_attention_per_sample():
    # 6 N per token plus 12 L (h q) t per token over its own sample's t tokens: padding adds nothing
    assert training_flops(1000, 2, 8, [3, 5]) == 6 * 1000 * 8 + 12 * 2 * 8 * (9 + 25)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Directions and a reference cache for tiny (made by a trainer on the fly), as a config override list."""
    run_dir = tmp_path_factory.mktemp("assets")
    cfg = load_config("tiny", [f"run_dir={run_dir}", "resume=never", "export=false"])
    ctx = D.init_distributed("cpu")
    try:
        Trainer(cfg, ctx)
    finally:
        D.shutdown(ctx)
    return [f"procon.directions={run_dir / 'directions.safetensors'}",
            f"procon.reference_cache={run_dir / 'reference.safetensors'}"]


def second_step(run_dir, assets, extra) -> tuple[torch.Tensor, dict, int]:
    """(CE and ProCon sums, full gradients by parameter name, micro-batches) of step 2 after one
    optimizer step; l2sq penalty, so the gradient is smooth at z = z0 (l1's sign(0 +- rounding)
    would differ between any two exact-up-to-rounding computations)."""
    cfg = load_config("tiny", [f"run_dir={run_dir}", *assets, "norm=l2sq", "alpha=1.0", "resume=never",
                               "export=false", *extra])
    sums, grads, micro_batches, _ = second_step_gradients(cfg)
    return sums, grads, micro_batches


def test_packed_chunked_and_compiled_steps_equal_the_padded_full_logits_step(assets, tmp_path, monkeypatch):
    # compile with the "eager" backend: dynamo's full-graph capture of the layers with the ProCon hooks
    # and custom ops inside (fullgraph=True fails on any graph break), without inductor's C++ build time
    monkeypatch.setattr(D, "compile_decoder_layers", functools.partial(D.compile_decoder_layers, backend="eager"))
    variants = {"padded, full logits (as before)": ["packing=off", "chunked_ce=false", "compile=off"],
                "packed, chunked CE": ["packing=on"],
                "packed in 200-token rows, full logits": ["packing=on", "chunked_ce=false",
                                                          "tokens_per_micro_batch=200"],
                "packed, compiled layers": ["packing=on", "compile=on"]}
    results = {name: second_step(tmp_path / str(i), assets, extra) for i, (name, extra) in enumerate(variants.items())}
    (sums, grads, n_mb), *others = results.values()
    assert n_mb == 2 and sums[1] > 0
    assert results["packed in 200-token rows, full logits"][2] > n_mb
    for name, (s, g, _) in zip(list(results)[1:], others):
        torch.testing.assert_close(s, sums, rtol=1e-5, atol=0, msg=name)
        assert g.keys() == grads.keys(), name
        for key, ref in grads.items():
            assert (g[key] - ref).norm() <= 3e-5 * ref.norm() + 1e-8, (name, key)


@pytest.mark.skipif(os.environ.get("FASTPROCON_SLOW_TESTS") != "1", reason="SmolLM2 step: FASTPROCON_SLOW_TESTS=1")
def test_smollm2_packed_step_equals_padded():
    """One SmolLM2 forward+backward of the summed CE: packed row with chunked CE vs padded full logits."""
    from fastprocon.train.chunked_ce import OutputLayerLoss, predicted_positions
    model = load_model("smollm2").model.train()
    samples = random_samples(model.config.vocab_size, [61, 17, 40], seed=3)
    batch, row = packed_row(samples)

    def grads_of(loss):
        loss.backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), out

    from fastprocon.train.loss import ce_sum
    plain = grads_of(ce_sum(model(**packing.forward_kwargs(batch, varlen_kwargs=False), use_cache=False).logits,
                            batch["targets"]))
    with OutputLayerLoss(model).installed() as head:
        index = predicted_positions(row["targets"])
        head.arm(index, row["targets"].flatten()[index])
        packed = grads_of(model(**packing.forward_kwargs(row, varlen_kwargs=False), use_cache=False).logits)
    torch.testing.assert_close(packed[0], plain[0], rtol=1e-5, atol=0)
    for key, ref in plain[1].items():
        assert (packed[1][key] - ref).norm() <= 1e-4 * ref.norm() + 1e-8, key
