"""fastprocon.integrations on the tiny model: samples in padded and packed batches; one TRL
SFTTrainer step with add_procon equals one `fastprocon train` step (loss, penalty, gradients,
updated weights); packed (padding-free) TRL batches find the right z0; the plain-loop and
Trainer examples run; bad input is a one-line error. TRL tests skip when trl/datasets are absent."""
import importlib.util
import runpy
import sys
from pathlib import Path

import pytest
import torch

from fastprocon.data.examples import IGNORE_INDEX
from fastprocon.data.tokenize import collate
from fastprocon.integrations import ProCon
from fastprocon.integrations.samples import Segment, batch_samples, sample_segments
from fastprocon.models.load import load_model

REPO = Path(__file__).resolve().parents[2]
HAVE_TRL = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
needs_trl = pytest.mark.skipif(not HAVE_TRL, reason="trl and datasets not installed (pip install -e '.[trl]')")


def test_importing_fastprocon_needs_neither_trl_nor_datasets():
    code = ("import sys; sys.modules['trl'] = None; sys.modules['datasets'] = None; "
            "import fastprocon, fastprocon.train, fastprocon.integrations; print('ok')")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_sample_segments_in_padded_and_packed_batches():
    ids = torch.arange(12).reshape(2, 6)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = right.flip(1)
    assert sample_segments(ids, right) == [Segment(0, 0, 4), Segment(1, 0, 6)]
    assert sample_segments(ids, left) == [Segment(0, 2, 6), Segment(1, 0, 6)]
    packed = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert sample_segments(ids, None, packed) == [Segment(0, 0, 3), Segment(0, 3, 5), Segment(0, 5, 6),
                                                  Segment(1, 0, 4), Segment(1, 4, 6)]
    # padding after a packed row (position_ids padded with 0, attention_mask 0 there)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]] * 2)
    assert sample_segments(ids, mask, packed) == [Segment(0, 0, 3), Segment(0, 3, 5), Segment(1, 0, 4),
                                                  Segment(1, 4, 5)]


def test_the_same_sample_has_the_same_key_padded_or_packed():
    a_ids, b_ids = torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11])
    a_lab, b_lab = torch.tensor([-100, -100, 7, 8]), torch.tensor([-100, 10, 11])
    padded = {"input_ids": torch.stack([a_ids, torch.cat([b_ids, torch.tensor([0])])]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
              "labels": torch.stack([a_lab, torch.cat([b_lab, torch.tensor([-100])])])}
    packed = {"input_ids": torch.cat([b_ids, a_ids])[None], "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]]),
              "labels": torch.cat([b_lab, a_lab])[None]}
    _, keys_padded, mask = batch_samples(padded)
    _, keys_packed, _ = batch_samples(packed)
    assert keys_padded == keys_packed[::-1] and len(set(keys_padded)) == 2
    assert mask.tolist() == [[False, False, True, True], [False, True, True, False]]


@pytest.fixture(scope="module")
def tiny_directions(tmp_path_factory):
    """Directions of the tiny model, made once by ProCon itself (the built-in prompts)."""
    path = tmp_path_factory.mktemp("dirs") / "directions.safetensors"
    loaded = load_model("tiny")
    ProCon(loaded.model, loaded.tokenizer, directions=str(path)).remove()
    assert path.exists()
    return path


def tiny_batches(tokenizer, n=8, batch_size=4):
    from fastprocon.data.examples import load_examples, resolve_data_path
    from fastprocon.data.tokenize import tokenize_examples
    examples, _ = tokenize_examples(load_examples(resolve_data_path("benign"))[:n], tokenizer, 96)
    batches = [collate(examples[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, n, batch_size)]
    for b in batches:
        del b["ids"]
    return batches


# -- the plain loop: exact penalty at the initial weights, errors ---------------------------------

def sgd_steps(procon, model, batches, n):
    """``n`` SGD steps of a plain loop, each over all ``batches``; the logged penalty of each."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    values = []
    for step in range(n):
        procon.begin_step(step, batches)
        for b in batches:
            model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append(procon.log_values()["procon"])
    return values


def test_plain_loop_penalty_is_zero_at_the_initial_weights_then_grows(tiny_directions):
    loaded = load_model("tiny")
    model, tok = loaded.model, loaded.tokenizer
    batches = tiny_batches(tok)
    procon = ProCon(model, tok, alpha=1.0, directions=str(tiny_directions))
    procon.record_reference(batches[::-1])             # recorded in another order and batch position
    values = sgd_steps(procon, model, batches, 2)
    assert values[0] < 1e-4 and values[1] > 1e-2, values
    model.eval()
    with torch.no_grad():                               # evaluation forwards are not constrained
        model(**batches[0])
    assert procon.log_values()["procon"] is None
    procon.remove()


def test_band_widths_from_the_recorded_z0_and_a_ce_only_first_step(tiny_directions):
    """norm="band": widths set from the z0 cache the pre-pass records; at the initial weights the
    gradient is exactly CE's (z0 recorded in another batch order), later the penalty acts."""
    from fastprocon.procon.setup import band_widths

    grads, values = [], []
    for settings in (dict(alpha=1.0, norm="band", band_fraction=0.05), dict(schedule="off")):
        loaded = load_model("tiny")
        model, batches = loaded.model.train(), tiny_batches(loaded.tokenizer)
        procon = ProCon(model, loaded.tokenizer, directions=str(tiny_directions), **settings)
        procon.record_reference(batches[::-1])
        if settings.get("norm") == "band":
            assert torch.equal(procon.hooks.widths, band_widths(procon.reference, procon.layers, 0.05))
        procon.begin_step(0, batches)
        for b in batches:
            model(**b).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        values.append(procon.log_values()["procon"])
        procon.remove()
    assert values == [0.0, None]
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_bad_input_is_a_one_line_error(tiny_directions, tmp_path):
    loaded = load_model("tiny")
    model, tok = loaded.model, loaded.tokenizer
    batches = tiny_batches(tok)

    def one_line(excinfo, *words):
        message = str(excinfo.value)
        assert "\n" not in message and all(w in message for w in words), message

    # directions made for another model
    other = load_model("tiny").model
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(0.01)
    with pytest.raises(ValueError) as err:
        ProCon(other, tok, directions=str(tiny_directions))
    one_line(err, "fingerprint")
    # a tokenizer without a chat template
    bare = load_model("tiny").tokenizer
    bare.chat_template = None
    with pytest.raises(ValueError) as err:
        ProCon(model, bare, directions=str(tiny_directions))
    one_line(err, "chat template")
    procon = ProCon(model, tok, directions=str(tiny_directions))
    procon.record_reference(batches[:1])
    model.train()
    # a batch with no response tokens
    empty = {**batches[1], "labels": torch.full_like(batches[1]["labels"], IGNORE_INDEX)}
    with pytest.raises(ValueError) as err:
        procon.begin_step(0, [empty])
    one_line(err, "no response tokens", "step 0")
    # a sample whose z0 is not in the cache
    procon.begin_step(0, [batches[1]])
    with pytest.raises(ValueError) as err:
        model(**batches[1])
    one_line(err, "no z0", "reference cache")
    # labels not passed to the forward
    with pytest.raises(ValueError) as err:
        model(input_ids=batches[0]["input_ids"])
    one_line(err, "labels")
    procon.remove()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients_and_penalty(tiny_directions, reentrant):
    results = []
    for checkpointing in (False, True):
        loaded = load_model("tiny")
        model, tok = loaded.model, loaded.tokenizer
        batch = tiny_batches(tok, n=4)[0]
        procon = ProCon(model, tok, alpha=1.0, directions=str(tiny_directions))
        procon.record_reference([batch])
        perturb(model)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        procon.begin_step(0, [batch])
        model(**batch).loss.backward()
        results.append(({n: p.grad for n, p in model.named_parameters()}, procon.log_values()["procon"]))
        procon.remove()
    (plain, plain_value), (ckpt, ckpt_value) = results
    assert ckpt_value == pytest.approx(plain_value, rel=1e-6) and plain_value > 1
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)


# -- TRL --------------------------------------------------------------------------------------------

def perturb(model):
    """The same seeded change of every decoder-layer weight, so z moves away from z0 (the L1
    penalty's gradient is sign(z - z0): at z = z0 it would compare rounding noise)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name:
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_(0.05 * torch.randn(local.shape, generator=gen))


def fastprocon_step(run_dir):
    """One step of fastprocon's own trainer on tiny (2 micro-batches of 4): its data, CE, ProCon,
    gradients and updated weights, with the model perturbed after z0 was recorded."""
    import fastprocon.distributed as D
    from fastprocon.train import Trainer, load_config
    from fastprocon.train.checkpoint import full_model_state_dict

    cfg = load_config("tiny", [f"run_dir={run_dir}", "batch_size=8", "micro_batch_size=4", "alpha=0.5",
                               "lr_warmup_steps=0", "grad_clip=0", "export=false", "safety_samples=0"])
    ctx = D.init_distributed("cpu")
    try:
        trainer = Trainer(cfg, ctx)
        perturb(trainer.model)
        with trainer.hooks.installed():
            trainer.accumulate_gradients(0)
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                     for n, p in trainer.model.named_parameters()}
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer._reset_interval()
            trainer.step(0)
        record = trainer.flush_metrics(1)
        weights = full_model_state_dict(trainer.model)
        examples = [trainer.data.examples[i] for i in trainer.batches.global_indices(0)]
        del trainer
    finally:
        D.shutdown(ctx)
    return examples, record, grads, weights


@needs_trl
def test_one_trl_step_equals_one_fastprocon_train_step(tmp_path):
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from fastprocon.integrations import add_procon, tokenized_dataset

    examples, record, grads, weights = fastprocon_step(tmp_path / "run")
    loaded = load_model("tiny")
    dataset = tokenized_dataset(examples, loaded.tokenizer, 128)     # the same 8 samples, tokens and labels
    seen = {}

    class GradsBeforeStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    config = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler_type="constant",
                       adam_beta2=0.95, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                       report_to=[], use_cpu=True, max_length=128, seed=0, bf16=False)
    trainer = SFTTrainer(model=loaded.model, args=config, train_dataset=dataset, processing_class=loaded.tokenizer,
                         callbacks=[GradsBeforeStep()])
    add_procon(trainer, alpha=0.5, directions=str(tmp_path / "run" / "directions.safetensors"))
    perturb(trainer.model)
    trainer.train()
    log = next(r for r in trainer.state.log_history if "loss" in r)
    assert log["loss"] == pytest.approx(record["ce"], rel=1e-5)
    assert log["procon"] == pytest.approx(record["procon"], rel=1e-5) and record["procon"] > 1
    assert log["procon_alpha"] == record["alpha"] == 0.5
    for name, g in grads.items():
        torch.testing.assert_close(seen[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # Adam's first step moves each weight by lr * g / (|g| + eps): where g is rounding noise around 0
    # its sign decides the move, so the weights are compared where the gradient is not noise
    # (gradients agree to atol 1e-6 + rtol 1e-4, so above 1e-4 their signs and these moves agree)
    compared = total = 0
    for name, w in trainer.model.state_dict().items():
        g = grads[name if name in grads else "model.embed_tokens.weight"]    # lm_head is tied to embed_tokens
        kept = g.abs() > 1e-4
        compared, total = compared + int(kept.sum()), total + kept.numel()
        torch.testing.assert_close(w[kept], weights[name][kept], rtol=1e-5, atol=1e-6, msg=name)
    assert compared > total / 2, (compared, total)


@needs_trl
def test_packed_trl_batches_find_the_right_z0(tmp_path, tiny_directions):
    """z0 recorded from padded batches, training on packed (padding-free) ones: at the initial
    weights the penalty is ~0 only if every sample's z0 lands on its own tokens."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fastprocon.data.examples import load_examples, resolve_data_path
    from fastprocon.integrations import add_procon

    rows = [{"prompt": [{"role": "user", "content": ex.prompt}],
             "completion": [{"role": "assistant", "content": ex.response}]}
            for ex in load_examples(resolve_data_path("benign"))[:12]]
    cache = tmp_path / "z0.safetensors"
    logs = {}
    for packing in (False, True):
        loaded = load_model("tiny")
        config = SFTConfig(output_dir=str(tmp_path / f"p{packing}"), max_steps=1, per_device_train_batch_size=4,
                           learning_rate=1e-9, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                           max_length=96, packing=packing, padding_free=packing, seed=0, bf16=False)
        trainer = SFTTrainer(model=loaded.model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=loaded.tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("attention_mask" not in batch and (batch["position_ids"] == 0).sum() > 1) if packing else \
            batch["input_ids"].shape[0] == 4
        add_procon(trainer, alpha=1.0, directions=str(tiny_directions), reference_cache=str(cache))
        trainer.train()
        logs[packing] = next(r for r in trainer.state.log_history if "loss" in r)
    assert logs[True]["procon"] < 1e-3, logs
    assert logs[False]["procon"] < 1e-3, logs


# -- the examples -------------------------------------------------------------------------------------

def run_example(name, *argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, *argv])
    module = runpy.run_path(str(REPO / "examples" / name), run_name="__main__")
    return capsys.readouterr().out, module


def test_custom_loop_example(monkeypatch, capsys):
    out, _ = run_example("custom_loop.py", "--steps", "2", monkeypatch=monkeypatch, capsys=capsys)
    assert "'step': 2" in out and "'procon_alpha': 0.1" in out, out[-2000:]


def test_hf_trainer_example(tmp_path, monkeypatch, capsys):
    out, _ = run_example("hf_trainer.py", "--steps", "3", "--out", str(tmp_path), monkeypatch=monkeypatch,
                         capsys=capsys)
    lines = [line for line in out.splitlines() if line.startswith("{'step'")]
    assert len(lines) == 3 and "'procon_alpha': 1.0" in lines[0] and "'procon_alpha': 0.0" in lines[2], out[-2000:]


@needs_trl
def test_trl_sft_example(tmp_path, monkeypatch, capsys):
    from fastprocon.integrations.hf import steps_per_epoch
    out, module = run_example("trl_sft.py", "--steps", "2", "--out", str(tmp_path), monkeypatch=monkeypatch,
                              capsys=capsys)
    lines = [line for line in out.splitlines() if line.startswith("{'step'")]
    assert len(lines) == 2 and all("'procon_alpha': 1.0" in line for line in lines), out[-2000:]
    # 48 benign + 16 safety rows, 4 per micro-batch, 2 micro-batches per step: the warm-up epoch is 8 steps
    assert len(module["dataset"]) == 64 and steps_per_epoch(module["trainer"]) == 8


def test_warmup_by_epochs_switches_at_the_epoch_boundary(tiny_directions):
    loaded = load_model("tiny")
    procon = ProCon(loaded.model, loaded.tokenizer, schedule="warmup", alpha=2.0, alpha_after=0.01,
                    alpha_warmup_epochs=1.5, steps_per_epoch=4, directions=str(tiny_directions))
    assert [procon.schedule(s) for s in range(8)] == [2.0] * 6 + [0.01] * 2
    procon.remove()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        ProCon(loaded.model, loaded.tokenizer, schedule="warmup", alpha_warmup_epochs=1.0,
               directions=str(tiny_directions))


@needs_trl
def test_safety_mix_adds_k_refusal_rows_in_the_dataset_format():
    from datasets import Dataset

    from fastprocon.integrations import with_safety_samples
    chat = Dataset.from_list([{"messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": f"a{i}"}], "source": "mine"}
                              for i in range(5)])
    mixed = with_safety_samples(chat, 3, seed=1)
    assert len(mixed) == 8 and mixed.column_names == ["messages", "source"]
    added = [r for r in mixed if r["source"] is None]
    assert len(added) == 3 and all(r["messages"][-1]["role"] == "assistant" for r in added)
    assert [r["messages"] for r in with_safety_samples(chat, 3, seed=1)] == [r["messages"] for r in mixed]
    with pytest.raises(ValueError, match="expected 'messages' or 'prompt'"):
        with_safety_samples(Dataset.from_list([{"text": "x"}]), 1)


def test_torchrun_fsdp_example(tmp_path):
    import json
    import os
    import subprocess
    env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(REPO / "examples" / "torchrun_fsdp.sh"), "max_steps=2", "export=false",
                          "log_every=1"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["final_step"] == 2 and summary["last_procon"] is not None


def test_lora_model_takes_base_directions_and_adapters_off_z0(tiny_directions):
    from peft import LoraConfig, get_peft_model
    loaded = load_model("tiny")
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    procon = ProCon(model, loaded.tokenizer, alpha=1.0, directions=str(tiny_directions))  # made for the base model
    assert procon.cfg.reference == "adapters_off" and not procon.needs_reference
    values = sgd_steps(procon, model, tiny_batches(loaded.tokenizer), 2)
    assert values[0] == 0 and values[1] > 1e-3, values    # LoRA starts as the identity: z = z0 exactly
    procon.remove()


@pytest.mark.parametrize("setting, said", [({"is_fsdp_enabled": True}, "FSDP or DeepSpeed"),
                                           ({"is_deepspeed_enabled": True}, "FSDP or DeepSpeed"),
                                           ({"world_size": 2}, "2 processes"), ({"fp16": True}, "fp16")])
def test_add_procon_refuses_sharded_multi_process_and_fp16_trainers(setting, said):
    from types import SimpleNamespace

    from fastprocon.integrations import add_procon
    args = SimpleNamespace(world_size=setting.get("world_size", 1), fp16=setting.get("fp16", False))
    trainer = SimpleNamespace(args=args, is_fsdp_enabled=setting.get("is_fsdp_enabled", False),
                              is_deepspeed_enabled=setting.get("is_deepspeed_enabled", False))
    with pytest.raises(ValueError, match=said):
        add_procon(trainer)
