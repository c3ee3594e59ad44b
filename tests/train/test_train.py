"""The trainer on the tiny model, single process: a CLI run and its run directory, ProCon's effect
(measured), the warm-up switch, kill-and-resume equality, interrupted checkpoint writes,
non-finite stops, LoRA with adapters-off references, activation checkpointing, bf16 mixed
precision, and the errors for mismatched directions, reference caches, checkpoints and data,
corrupt checkpoints and metrics, missing explicit paths, a used or locked run directory."""
import importlib.util
import json
import re

import pytest
import torch

import fastprocon.procon.hooks as hooks_module
import fastprocon.train.checkpoint as checkpoint_module
from fastprocon.cli import main
from fastprocon.models.load import load_model
from fastprocon.procon.reference import ReferenceCache, compute_projections
from fastprocon.refusal.directions import load_directions, save_directions
from fastprocon.train import NonFiniteError, Trainer, load_config, train
from fastprocon.train.config import to_toml
from fastprocon.train.metrics import read_metrics
from fastprocon.train.prepare import load_training_data
from fastprocon.utils.checksums import write_manifest

COMPARED = ("step", "ce", "procon", "alpha", "lr", "grad_norm")


def overrides(run_dir, *extra, assets=None):
    items = [f"run_dir={run_dir}", "max_steps=8", "log_every=1", "checkpoint_every=4", "export=false"]
    if assets is not None:
        items += [f"procon.directions={assets / 'directions.safetensors'}",
                  f"procon.reference_cache={assets / 'reference.safetensors'}"]
    return items + list(extra)


def run(run_dir, *extra, assets=None):
    return train(load_config("tiny", overrides(run_dir, *extra, assets=assets)))


def compared(records):
    return [{k: r[k] for k in COMPARED} for r in records]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The reference run, through the CLI: 8 steps of ProCon_s on tiny, checkpoints at 4 and 8."""
    run_dir = tmp_path_factory.mktemp("base")
    argv = ["train", "--config", "tiny", *overrides(run_dir, "export=true")]
    assert main(argv) == 0
    return run_dir


def test_cli_run_leaves_a_complete_run_directory(base_run, capsys):
    cfg = load_config(str(base_run / "config.toml"))
    assert to_toml(cfg) == (base_run / "config.toml").read_text() and cfg.train.max_steps == 8
    records = read_metrics(base_run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert r["alpha"] == 0.2 and r["procon"] >= 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["lr"] > 0 and r["peak_rss_gib"] > 0 and r["mfu"] is None
    # loss decreases (packed by default: l1's sign noise at z = z0 makes the path bumpy, see test_packing.py)
    assert min(r["ce"] for r in records[1:]) < records[0]["ce"] - 0.2, [r["ce"] for r in records]
    ckpts = base_run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000008"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000004", "step_000008"]
    state = json.loads((ckpts / "step_000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["world_size"] == 1 and state["data"]["epoch"] == 1
    summary = json.loads((base_run / "summary.json").read_text())
    assert summary["final_step"] == 8 and summary["constrained_layers"] == [1, 2, 3]

    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(base_run / "model")
    initial = load_model("tiny").model
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()   # tied
    assert not torch.equal(exported.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)
    copied = load_directions(base_run / "model" / "directions.safetensors")
    assert torch.equal(copied.directions, load_directions(base_run / "directions.safetensors").directions)
    assert load_model(str(base_run / "model")).tokenizer.chat_template


def projection_drift(model_dir, assets) -> float:
    """Mean |z - z0| over response tokens and constrained layers of the training data."""
    loaded = load_model(str(model_dir))
    cache = ReferenceCache.load(assets / "reference.safetensors", model_fingerprint=None,
                                       directions_hash=None, dataset_hash=None, max_length=None, layers=None)
    data = load_training_data(load_config("tiny"), loaded.tokenizer)
    directions = load_directions(assets / "directions.safetensors")
    ids, pieces = compute_projections(loaded, directions, data.examples, cache.layers, batch_size=16)
    labels = {ex.id: torch.tensor(ex.labels)[None] for ex in data.examples}
    total = count = 0.0
    for sample_id, z in zip(ids, pieces):
        lab = labels[sample_id]
        z0 = cache.gather([sample_id], lab)[:, 0, lab[0] != -100]
        total += (z - z0).abs().sum().item()
        count += z.numel()
    return total / count


def test_procon_keeps_projections_closer_to_z0(base_run, tmp_path):
    drift = {}
    for name, extra in (("off", "schedule=off"), ("procon", "alpha=2.0")):
        result = run(tmp_path / name, extra, "export=true", "checkpoint_every=0", assets=base_run)
        drift[name] = projection_drift(result.export_dir, base_run)
    assert drift["procon"] < 0.5 * drift["off"], drift


def test_warmup_switches_the_penalty_off(base_run, tmp_path, monkeypatch, capsys):
    calls = []
    original = hooks_module.AnchorProjectionFunction

    class Counting:   # what the hooks call at each constrained layer
        apply = staticmethod(lambda *a: calls.append(1) or original.apply(*a))

    monkeypatch.setattr(hooks_module, "AnchorProjectionFunction", Counting)
    run(tmp_path, "max_steps=4", "schedule=warmup", "alpha=1.0", "alpha_warmup_steps=2", "reduction=token",
        "tensorboard=true", "tokens_per_micro_batch=512", assets=base_run)   # 2 packed rows a step
    records = read_metrics(tmp_path)
    assert [r["alpha"] for r in records] == [1.0, 1.0, 0.0, 0.0]
    assert [r["procon"] is None for r in records] == [False, False, True, True]
    assert len(calls) == 2 * 2 * 3   # 2 warm-up steps x 2 rows x 3 layers, none afterwards
    if importlib.util.find_spec("tensorboard") is None:   # optional: a note, and the run goes on
        assert "tensorboard is not installed" in capsys.readouterr().out
    else:
        assert (tmp_path / "tensorboard").is_dir()


def run_killed_at_step_6(run_dir, base_run, monkeypatch):
    """The base run's settings in ``run_dir``, killed during step 6 (checkpoint at 4)."""
    original = Trainer.step

    def crash_at_step_6(self, step):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step)

    monkeypatch.setattr(Trainer, "step", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(run_dir, assets=base_run)
    monkeypatch.undo()


def test_kill_and_resume_equals_uninterrupted(base_run, tmp_path, monkeypatch):
    run_killed_at_step_6(tmp_path, base_run, monkeypatch)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    result = run(tmp_path, assets=base_run)
    assert result.start_step == 4
    assert compared(read_metrics(tmp_path)) == compared(read_metrics(base_run))   # bitwise equal on CPU fp32


def test_harmless_changes_on_resume_give_bitwise_the_same_steps(base_run, tmp_path, monkeypatch):
    """checkpoint_every and keep_checkpoints changed on resume: the steps are bitwise those of the
    uninterrupted run (and no override is needed; log_every changes only which interval means are logged)."""
    run_killed_at_step_6(tmp_path, base_run, monkeypatch)
    result = run(tmp_path, "checkpoint_every=2", "keep_checkpoints=3", assets=base_run)
    assert result.start_step == 4
    assert compared(read_metrics(tmp_path)) == compared(read_metrics(base_run))


def test_a_longer_run_on_resume_continues_bitwise_when_the_lr_does_not_depend_on_it(tmp_path):
    """max_steps raised on resume: with a constant LR after warm-up (min_lr_ratio = 1) the steps equal
    those of a run that had the longer max_steps from the start (with a cosine decay the resumed run
    follows the new schedule, which the trainer announces)."""
    flat = ("min_lr_ratio=1.0", "checkpoint_every=2")
    run(tmp_path / "whole", *flat)
    run(tmp_path / "resumed", *flat, "max_steps=4")
    run(tmp_path / "resumed", *flat)
    assert compared(read_metrics(tmp_path / "resumed")) == compared(read_metrics(tmp_path / "whole"))


@pytest.mark.parametrize("crash_point", ["before_rename", "before_latest"])
def test_interrupted_checkpoint_write_does_not_break_resume(base_run, tmp_path, monkeypatch, crash_point):
    saves = []
    original_fsync, original_atomic = checkpoint_module._fsync_dir, checkpoint_module.atomic_path

    def fsync_dir(path):   # called on the temp dir right before the rename
        if crash_point == "before_rename" and path.name.startswith(".tmp-step_000008"):
            raise KeyboardInterrupt("killed before the rename")
        return original_fsync(path)

    def atomic_path(path):   # the `latest` pointer update, after the rename
        saves.append(path)
        if crash_point == "before_latest" and len(saves) == 2:
            raise KeyboardInterrupt("killed before updating latest")
        return original_atomic(path)

    monkeypatch.setattr(checkpoint_module, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(checkpoint_module, "atomic_path", atomic_path)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, assets=base_run)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    leftover = ".tmp-step_000008" if crash_point == "before_rename" else "step_000008"
    assert (ckpts / leftover).is_dir()
    monkeypatch.undo()
    result = run(tmp_path, assets=base_run)
    assert result.start_step == 4
    assert (ckpts / "latest").read_text().strip() == "step_000008"
    assert not list(ckpts.glob(".tmp-*"))
    assert compared(read_metrics(tmp_path)) == compared(read_metrics(base_run))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    argv = ["train", "--config", "tiny", *overrides(tmp_path, "schedule=off", "lr=1e30", "checkpoint_every=1",
                                                       "grad_clip=0")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient norm at step 2" in err and "step_000001" in err
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    with pytest.raises(NonFiniteError, match="at step 2"):
        run(tmp_path, "schedule=off", "lr=1e30", "checkpoint_every=1", "grad_clip=0")


def test_activation_checkpointing_gives_the_same_steps(base_run, tmp_path):
    run(tmp_path, "activation_checkpointing=true", "max_steps=2", assets=base_run)
    got, want = read_metrics(tmp_path), read_metrics(base_run)[:2]
    for g, w in zip(got, want):
        for key in ("ce", "procon", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), key


def test_bf16_mixed_precision_computes_in_bf16_and_keeps_fp32_weights(base_run, tmp_path, monkeypatch):
    """FSDP2's bf16 policy (the CUDA default) on CPU: the hooks see bf16 hidden states, step 1
    (same weights as the fp32 run) differs from it by bf16 rounding only, and the checkpointed
    master weights and optimizer state stay fp32."""
    from torch.distributed.checkpoint import FileSystemReader
    seen = []
    original = hooks_module.AnchorProjectionFunction

    class Recording:   # what the hooks call at each constrained layer
        apply = staticmethod(lambda h, *a: seen.append(h.dtype) or original.apply(h, *a))

    monkeypatch.setattr(hooks_module, "AnchorProjectionFunction", Recording)
    run(tmp_path, "model.mixed_precision=bf16", "max_steps=4", assets=base_run)
    assert seen and set(seen) == {torch.bfloat16}
    got, want = read_metrics(tmp_path), read_metrics(base_run)
    assert got[0]["ce"] != want[0]["ce"] and got[0]["ce"] == pytest.approx(want[0]["ce"], rel=2e-3)
    assert all(torch.isfinite(torch.tensor([r["ce"], r["procon"], r["grad_norm"]])).all() for r in got)
    metadata = FileSystemReader(str(tmp_path / "checkpoints" / "step_000004")).read_metadata().state_dict_metadata
    tensors = {k: m.properties.dtype for k, m in metadata.items() if hasattr(m, "properties")}
    assert any(k.startswith("model.") for k in tensors) and any(k.startswith("optim.") for k in tensors)
    assert {dtype for k, dtype in tensors.items() if k.startswith(("model.", "optim.state."))} == {torch.float32}


def test_lora_with_adapters_off_reference(tmp_path):
    result = run(tmp_path, "model.lora=true", "lora_rank=4", "reference=adapters_off", "max_steps=3", "lr=1e-2",
                 "export=true", "activation_checkpointing=true")
    records = read_metrics(tmp_path)
    assert records[0]["procon"] < 1e-4 < records[-1]["procon"]   # z starts at z0 (adapters start at zero)
    assert not (tmp_path / "reference.safetensors").exists()
    merged = load_model(str(result.export_dir)).model
    initial = load_model("tiny").model
    trained, frozen = merged.model.layers[1], initial.model.layers[1]
    assert not torch.equal(trained.self_attn.q_proj.weight, frozen.self_attn.q_proj.weight)   # LoRA merged
    assert torch.equal(trained.mlp.up_proj.weight, frozen.mlp.up_proj.weight)                 # not adapted


def test_directions_from_another_model_are_refused(base_run, tmp_path):
    other = load_directions(base_run / "directions.safetensors")
    other.metadata["fingerprint"] = "0" * 64
    save_directions(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="directions were extracted from another model"):
        run(tmp_path / "run", f"procon.directions={tmp_path / 'other.safetensors'}")


def test_reference_cache_for_other_data_is_refused(base_run, tmp_path):
    with pytest.raises(ValueError, match="reference cache .* does not match: max_length expected 100, found 128"):
        run(tmp_path, "max_length=100", assets=base_run)
    with pytest.raises(ValueError, match="reference cache .* does not match: dataset_hash"):
        run(tmp_path / "seed", "seed=1", "safety_samples=8", assets=base_run)


def test_resume_with_another_batch_plan_is_refused(base_run, tmp_path):
    with pytest.raises(ValueError, match="cannot resume .* train.batch_size = 8, this config gives 4"):
        run(tmp_path, f"resume={base_run / 'checkpoints' / 'step_000004'}", "batch_size=4", assets=base_run)


def test_data_problems_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: missing field 'output'"):
        run(tmp_path / "a", f"data.train={bad}", "schedule=off")
    with pytest.raises(ValueError, match="safety_samples = 99 but safety has only 32"):
        run(tmp_path / "b", "safety_samples=99", "schedule=off")
    small = tmp_path / "small.jsonl"
    small.write_text('{"instruction": "hi", "output": "hello"}\n')
    with pytest.raises(ValueError, match="has 17 examples, fewer than one batch.*batch_size = 32"):
        run(tmp_path / "c", f"data.train={small}", "batch_size=32", "schedule=off")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        run(tmp_path / "d", f"data.train={tmp_path / 'nope.json'}", "schedule=off")


def test_overlong_prompts_are_an_error_or_dropped_on_request(tmp_path):
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(16)]
    rows.append({"instruction": "long " * 200, "output": "never seen"})
    data = tmp_path / "long.json"
    data.write_text(json.dumps(rows))
    common = (f"data.train={data}", "safety_samples=0", "max_length=64", "max_steps=1", "batch_size=8")
    with pytest.raises(ValueError,
                       match=r"1 example\(s\) have prompts of >= max_length=64.*data.drop_overlong_prompts"):
        run(tmp_path / "a", *common)
    result = run(tmp_path / "b", *common, "drop_overlong_prompts=true")
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["examples"] == 16 and summary["final_step"] == 1


# -- resume and run-directory errors (schedule=off: no directions needed, a few seconds a run) ---

def quick(run_dir, *extra):
    return run(run_dir, "schedule=off", "max_steps=2", "checkpoint_every=1", *extra)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """2 steps of plain fine-tuning with checkpoints at 1 and 2; tests damage copies of it."""
    run_dir = tmp_path_factory.mktemp("short")
    quick(run_dir)
    return run_dir


def copy_of(run_dir, tmp_path):
    import shutil
    return shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))


def test_resume_follows_the_lr_schedule_of_the_config(short_run, tmp_path, capsys):
    from fastprocon.train.schedule import WarmupCosine
    run_dir = copy_of(short_run, tmp_path)
    capsys.readouterr()
    quick(run_dir, "max_steps=4", "lr=1e-3", "resume_changes=lr")    # a longer run at another lr (allowed)
    out = capsys.readouterr().out
    assert "LR schedule changed since step_000002 (lr 0.003 -> 0.001, total steps 2 -> 4)" in out
    o = load_config("tiny").optim
    schedule = WarmupCosine(o.lr_warmup_steps, 4, o.min_lr_ratio)
    records = [r for r in read_metrics(run_dir) if "ce" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["lr"] for r in records[2:]] == pytest.approx([1e-3 * schedule(3), 1e-3 * schedule(4)], rel=1e-12)


def test_resume_with_another_model_is_refused(short_run, tmp_path):
    run_dir = copy_of(short_run, tmp_path)
    fix = "use checkpoint.resume = 'never' and another run_dir"
    with pytest.raises(ValueError, match=f"cannot resume from .*step_000002: it was trained with model.lora False, "
                                         f"this config gives True; {fix}"):
        quick(run_dir, "max_steps=3", "model.lora=true")
    state_file = run_dir / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key, value, said in (("model_fingerprint", "0" * 64, "model fingerprint '0000"),
                             ("model", "smollm2", "model 'smollm2', this config gives 'tiny'")):
        state_file.write_text(json.dumps({**state, key: value}))
        write_manifest(state_file.parent)   # a genuine checkpoint of another model, not a damaged one
        with pytest.raises(ValueError, match=f"it was trained with {said}"):
            quick(run_dir, "max_steps=3")


def test_a_refused_run_leaves_config_toml_alone(short_run, tmp_path):
    run_dir = copy_of(short_run, tmp_path)
    before = (run_dir / "config.toml").read_text()
    with pytest.raises(ValueError, match="batch_size = 8, this config gives 4"):
        quick(run_dir, "max_steps=3", "batch_size=4")
    assert (run_dir / "config.toml").read_text() == before
    quick(run_dir, "max_steps=3")
    assert load_config(str(run_dir / "config.toml")).train.max_steps == 2          # the first config, kept
    assert load_config(str(run_dir / "config.step_000002.toml")).train.max_steps == 3


def test_resume_never_in_a_used_run_dir_is_refused(short_run, tmp_path):
    run_dir = copy_of(short_run, tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"resume = 'never' but run directory .*run already holds a run: checkpoints "
                                         r"\(newest .*step_000002\); pick another run_dir"):
        quick(run_dir, "resume=never")
    assert (run_dir / "metrics.jsonl").read_text() == before
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text(before)
    with pytest.raises(ValueError, match="already holds a run: .*metrics.jsonl"):
        quick(tmp_path / "b", "resume=never")


def test_half_written_metrics_line_is_dropped_on_resume(short_run, tmp_path, capsys):
    run_dir = copy_of(short_run, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "ce": 4.')   # a crash mid-append
    quick(run_dir, "max_steps=3")
    assert "dropped the incomplete last line of" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not valid JSON"):
        quick(run_dir, "max_steps=4")


def truncate_shard(ckpt):
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])


@pytest.mark.parametrize("damage,said", [
    (truncate_shard, r"__0_0.distcp has 100 bytes, the manifest says \d+"),
    (lambda c: (c / ".metadata").unlink(), r"\.metadata is missing"),
    (lambda c: (c / "trainer_state.json").write_text("{"), r"trainer_state.json has 1 bytes, the manifest says \d+"),
    (lambda c: (c / "rng_rank0.pt").write_bytes(b"garbage"), r"rng_rank0.pt has 7 bytes, the manifest says \d+"),
])
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_resumed(short_run, tmp_path, capsys, damage, said):
    run_dir = copy_of(short_run, tmp_path)
    damage(run_dir / "checkpoints" / "step_000002")
    capsys.readouterr()
    result = quick(run_dir, "max_steps=3")
    assert re.search(rf"warning: checkpoint .*step_000002 is damaged \({said}\); resuming from the newest intact "
                     rf"one, .*step_000001\n", capsys.readouterr().out)
    assert result.start_step == 1 and [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_an_explicitly_named_damaged_checkpoint_is_refused(short_run, tmp_path):
    run_dir = copy_of(short_run, tmp_path)
    truncate_shard(run_dir / "checkpoints" / "step_000002")
    with pytest.raises(checkpoint_module.CheckpointError,
                       match=r"checkpoint .*step_000002 is damaged \(__0_0.distcp has 100 bytes.*\); to resume from "
                             r"the previous complete checkpoint set checkpoint.resume = '.*step_000001'"):
        quick(run_dir, "max_steps=3", f"resume={run_dir / 'checkpoints' / 'step_000002'}")


def test_an_unloadable_checkpoint_with_a_valid_manifest_names_itself_and_the_previous_one(short_run, tmp_path):
    run_dir = copy_of(short_run, tmp_path)
    truncate_shard(run_dir / "checkpoints" / "step_000002")
    write_manifest(run_dir / "checkpoints" / "step_000002")   # damaged before it was hashed
    with pytest.raises(checkpoint_module.CheckpointError,
                       match=r"checkpoint .*step_000002 is unreadable \(.*EOFError.*\); to resume from the previous "
                             r"complete checkpoint set checkpoint.resume = '.*step_000001'"):
        quick(run_dir, "max_steps=3")
    result = quick(run_dir, "max_steps=3", f"resume={run_dir / 'checkpoints' / 'step_000001'}")
    assert result.start_step == 1 and [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_an_empty_latest_pointer_is_a_clear_error(short_run, tmp_path):
    run_dir = copy_of(short_run, tmp_path)
    (run_dir / "checkpoints" / "latest").write_text("")
    with pytest.raises(checkpoint_module.CheckpointError,
                       match=r"latest is empty .*checkpoint.resume = '.*step_000002'"):
        quick(run_dir, "max_steps=3")


def test_explicit_directions_or_reference_paths_must_exist(base_run, tmp_path):
    typo = tmp_path / "typo.safetensors"
    with pytest.raises(FileNotFoundError, match=f"procon.directions = {typo} does not exist; leave it empty to make "
                                                "directions in the run directory"):
        run(tmp_path / "a", f"procon.directions={typo}", "max_steps=1")
    with pytest.raises(FileNotFoundError, match=f"procon.reference_cache = {typo} does not exist"):
        run(tmp_path / "b", f"procon.directions={base_run / 'directions.safetensors'}",
            f"procon.reference_cache={typo}", "max_steps=1")
    assert not typo.exists() and not list((tmp_path / "a").glob("*.safetensors"))


def test_a_second_run_in_the_same_run_dir_is_refused(tmp_path):
    import fcntl
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a") as held:   # another run holds the directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match=rf"run directory {run_dir} is in use \(lock {run_dir / '.lock'}"):
            quick(run_dir)
        assert not (run_dir / "config.toml").exists()
    with pytest.raises(FileNotFoundError, match="data file not found"):   # a failed run releases the lock ...
        quick(run_dir, f"data.train={tmp_path / 'nope.json'}")
    with open(run_dir / ".lock", "a") as mine:
        fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)      # ... so it is free now


def test_triton_backend_on_cpu_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the tests' interpreter would make it runnable
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        run(tmp_path, "procon.backend=triton")
    assert not (tmp_path / "directions.safetensors").exists()
