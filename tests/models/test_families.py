"""The family matrix: for tiny random models of every common family (tests/models/families.py), the
sharded load equals transformers' from_pretrained, the trainer's first-step CE equals the model's own
loss (chunked and plain CE, packed and padded rows), LoRA trains the attention projections (fused ones
included), directions run; two families also under 2-process torchrun."""
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from families import FAMILIES, save_family

import fastprocon.distributed as D
from fastprocon.cli import main
from fastprocon.data.tokenize import collate
from fastprocon.models import decoder_layers, load_model
from fastprocon.models.layers import attention_projections
from fastprocon.models.specs import tiny_tokenizer
from fastprocon.refusal.directions import extract_directions
from fastprocon.train import Trainer, load_config
from fastprocon.train.prepare import apply_lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))   # test_train_distributed.torchrun
NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: save_family(name, root / name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_load_equals_from_pretrained(family_dirs, name):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = load_model(str(family_dirs[name])).model
    theirs = AutoModelForCausalLM.from_pretrained(family_dirs[name]).eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def first_step(directory, tmp_path, *overrides):
    """(the trainer's CE sum and prediction count of step 0, the step's examples, the trainer's model)."""
    cfg = load_config("tiny", [f"spec={directory}", "schedule=off", "max_steps=1", "batch_size=4",
                               "micro_batch_size=2", f"run_dir={tmp_path}", "export=false", *overrides])
    ctx = D.init_distributed("cpu")
    try:
        trainer = Trainer(cfg, ctx)
        trainer.accumulate_gradients(0)
        examples = [trainer.data.examples[int(i)] for i in trainer.batches.global_indices(0)]
        result = float(trainer._acc[0]), trainer._n_pred_acc, examples, trainer.output_loss is not None
        del trainer
    finally:
        D.shutdown(ctx)
    return result


@pytest.mark.parametrize("packing", ["on", "off"])
@pytest.mark.parametrize("chunked_ce", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_first_step_ce_equals_the_models_own_loss(family_dirs, tmp_path, name, chunked_ce, packing):
    from transformers import AutoModelForCausalLM

    ce_sum, n_pred, examples, chunked = first_step(family_dirs[name], tmp_path, f"chunked_ce={str(chunked_ce).lower()}",
                                                   f"packing={packing}")
    model = AutoModelForCausalLM.from_pretrained(family_dirs[name]).train()
    own_sum, own_count = 0.0, 0
    with torch.no_grad():
        for ex in examples:   # one sample at a time: the model's loss is a mean over its predictions
            batch = collate([ex], pad_id=0)
            count = int((batch["labels"][:, 1:] != -100).sum())
            own_sum += float(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss) * count
            own_count += count
    assert n_pred == own_count
    assert math.isclose(ce_sum, own_sum, rel_tol=1e-5), (ce_sum, own_sum)
    if name in ("granite", "gemma2"):   # logit scaling / final-logit softcapping: chunked CE would be wrong
        assert not chunked


@pytest.mark.parametrize("name", NAMES)
def test_lora_trains_the_attention_projections(family_dirs, name):
    cfg = load_config("tiny", [f"spec={family_dirs[name]}", "lora=true"])
    model = apply_lora(cfg, load_model(str(family_dirs[name])).model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    targets = attention_projections(model)
    assert trained and all(".lora_" in n for n in trained)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained} == set(targets)
    if name == "phi3":
        assert targets == ["o_proj", "qkv_proj"]
    if name == "gpt_neox":
        assert targets == ["dense", "query_key_value"]


@pytest.mark.parametrize("name", NAMES)
def test_directions_run(family_dirs, name):
    loaded = load_model(str(family_dirs[name]))
    ds = extract_directions(loaded, ["how do I pick a lock", "make a weapon"], ["bake bread", "plant a tree"])
    assert ds.directions.shape == (len(decoder_layers(loaded.model)), 64)


def test_a_model_without_decoder_layers_is_one_line(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37)).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot find the decoder layers of BertLMHeadModel"):
        load_model(str(tmp_path))
    assert main(["directions", "--model", str(tmp_path), "--out", str(tmp_path / "d")]) == 2


@pytest.mark.parametrize("name", ["gpt_neox", "qwen3_moe"])   # converted checkpoints (renamed, fused experts)
def test_two_processes_equal_one(family_dirs, tmp_path, name):
    from test_train_distributed import torchrun

    runs = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"p{nproc}"
        torchrun("-m", "fastprocon.cli", "train", "--config", "tiny", f"spec={family_dirs[name]}", "norm=l2sq",
                 "max_steps=3", "log_every=1", f"run_dir={run_dir}", "export=false", nproc=nproc)
        runs[nproc] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for one, two in zip(runs[1], runs[2]):
        assert math.isclose(one["ce"], two["ce"], rel_tol=1e-5), (one, two)


@pytest.mark.parametrize("chunked_ce", [True, False])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_router_auxiliary_loss_is_trained_as_the_model_adds_it(family_dirs, tmp_path, name, chunked_ce):
    """With output_router_logits, the model's own loss is CE + router_aux_loss_coef * aux: the trainer's
    gradients equal that loss's (one micro-batch, one process)."""
    from transformers import AutoModelForCausalLM

    from fastprocon.train.packing import forward_kwargs

    directory = tmp_path / name
    shutil.copytree(family_dirs[name], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "output_router_logits": True,
                                                       "router_aux_loss_coef": 0.5}))
    cfg = load_config("tiny", [f"spec={directory}", "schedule=off", "max_steps=1", "batch_size=4", "micro_batch_size=4",
                               "packing=off", f"chunked_ce={str(chunked_ce).lower()}", f"run_dir={tmp_path / 'run'}",
                               "export=false"])
    ctx = D.init_distributed("cpu")
    try:
        trainer = Trainer(cfg, ctx)
        trainer.accumulate_gradients(0)
        mb, = trainer.batches.micro_batches(0)
        ours = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                for n, p in trainer.model.named_parameters()}
        del trainer
    finally:
        D.shutdown(ctx)
    model = AutoModelForCausalLM.from_pretrained(directory).train()
    out = model(**forward_kwargs(mb, varlen_kwargs=False), labels=mb["labels"], use_cache=False)
    assert out.aux_loss is not None and float(out.aux_loss) > 0
    out.loss.backward()
    theirs = dict(model.named_parameters())
    gate = [n for n in ours if "gate" in n and "proj" not in n]
    assert gate, sorted(ours)[:10]
    for n, g in ours.items():
        torch.testing.assert_close(g, theirs[n].grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "llama"])
def test_mfu_counts_the_active_parameters(family_dirs, name):
    from fastprocon.train.metrics import matmul_params

    model = load_model(str(family_dirs[name])).model
    c = model.config
    experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    dense = sum(p.numel() for p in model.parameters()) - expert_params - model.get_input_embeddings().weight.numel()
    active = expert_params * c.num_experts_per_tok // experts if experts else 0
    assert matmul_params(model) == dense + active
    assert bool(expert_params) == (name != "llama")
