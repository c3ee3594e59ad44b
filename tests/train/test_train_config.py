"""Trainer config: TOML + overrides, every bad-config error, round trip, schedules, batch plan."""
import math

import pytest

from fastprocon.cli import main
from fastprocon.data.tokenize import TokenizedExample
from fastprocon.procon.config import procon_scale
from fastprocon.procon.schedule import AlphaSchedule
from fastprocon.train.batches import StepBatches
from fastprocon.train.config import CONFIG_DIR, Config, ProConConfig, load_config, to_toml
from fastprocon.train.loss import example_counts
from fastprocon.train.schedule import WarmupCosine


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, '[procon]\nalpha = 2\nlayers = [1, 2]\n[train]\nname = "x"\n')
    cfg = load_config(path, ["lr=1e-4", "procon.schedule=warmup", "alpha_warmup_steps=3", "name=y",
                             "model.lora=true", 'data.train="my file.json"'])
    assert cfg.procon.alpha == 2.0 and isinstance(cfg.procon.alpha, float)   # an int is accepted for a float
    assert cfg.procon.layers == [1, 2] and cfg.procon.schedule == "warmup"
    assert cfg.optim.lr == 1e-4 and cfg.train.name == "y" and cfg.model.lora is True
    assert cfg.data.train == "my file.json"
    assert load_config(None).train.name == Config().train.name


def test_on_off_switches_take_booleans(tmp_path):
    cfg = load_config("tiny", ["packing=false", "compile=true"])
    assert cfg.data.packing == "off" and cfg.model.compile == "on"
    cfg = load_config(write(tmp_path, "[data]\npacking = true\n[model]\ncompile = false\n"))
    assert cfg.data.packing == "on" and cfg.model.compile == "off"
    with pytest.raises(TypeError, match="model.lora must be bool"):   # a bool key still takes only booleans
        load_config("tiny", ["lora=on"])
    with pytest.raises(TypeError, match="procon.norm must be str"):   # a choice without on/off takes no boolean
        load_config("tiny", ["norm=true"])


def test_builtin_configs_load_and_round_trip(tmp_path):
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    assert {"default", "tiny"} <= set(names)
    for name in names:
        cfg = load_config(name)
        again = load_config(write(tmp_path, to_toml(cfg), f"{name}.toml"))
        assert again == cfg
    default = load_config("default")
    assert default.model.spec == "smollm2" and default.procon.schedule == "warmup"
    assert default.data.safety_samples > 0 and default.procon.alpha_after == 0
    assert default.procon.norm == "band" and default.procon.reference == "cache"   # the band needs z0's spread


BAD_FILES = [
    ("[model]\nspek = 'tiny'\n", ValueError, r"unknown key 'spek' in section \[model\]"),
    ("[modle]\nspec = 'tiny'\n", ValueError, r"unknown section \[modle\]"),
    ("[optim]\nlr = 'fast'\n", TypeError, "optim.lr must be float, got str 'fast'"),
    ("[train]\nmax_steps = 2.5\n", TypeError, "train.max_steps must be int, got float"),
    ("[model]\nlora = 1\n", TypeError, "model.lora must be bool, got int"),
    ("[procon]\nlayers = [1, 'a']\n", TypeError, "procon.layers must be str or list of int"),
    ("[model\n", ValueError, "invalid TOML"),
    ("model = 3\n", ValueError, r"\[model\] must be a table"),
    ("alpha = 0.1\n[procon]\nnorm = 'l1'\n", ValueError,
     r"alpha = 0.1 is outside any section; put it under \[procon\]"),
]


@pytest.mark.parametrize("text,error,match", BAD_FILES)
def test_bad_config_file(tmp_path, text, error, match):
    path = write(tmp_path, text)
    with pytest.raises(error, match=match) as info:
        load_config(path)
    if "invalid TOML" not in match:
        assert path in str(info.value) or "section" in str(info.value)


BAD_OVERRIDES = [
    ("alpha", ValueError, "expected key=value"),
    ("=3", ValueError, "expected key=value"),
    ("alpah=0.1", ValueError, "unknown config key 'alpah'"),
    ("procon.alpah=0.1", ValueError, r"unknown key 'alpah' in section \[procon\]"),
    ("prcon.alpha=0.1", ValueError, "unknown section 'prcon'"),
    ("alpha=high", TypeError, "procon.alpha must be float, got str 'high'"),
    ("max_steps=true", TypeError, "train.max_steps must be int, got bool"),
    ("norm=l3", ValueError, "procon.norm = 'l3': expected one of 'l1', 'l2sq', 'huber'"),
    ("schedule=wu", ValueError, "procon.schedule"),
    ("reduction=layer", ValueError, "procon.reduction"),
    ("mixed_precision=fp8", ValueError, "model.mixed_precision"),
    ("alpha=-1", ValueError, "procon.alpha = -1.0: must be a finite number >= 0"),
    ("alpha=inf", ValueError, "procon.alpha = inf"),
    ("lr=0", ValueError, "optim.lr = 0.0: must be > 0"),
    ("batch_size=6", ValueError, r"train.batch_size = 6: must be a multiple of micro_batch_size \(4\)"),
    ("micro_batch_size=0", ValueError, "train.micro_batch_size"),
    ("max_length=1", ValueError, "data.max_length"),
    ("layers=some", ValueError, "procon.layers = 'some'"),
    ("layers=[]", ValueError, "non-empty list"),
    ("layers=[2, 2]", ValueError, "distinct"),
    ("reference=adapters_off", ValueError, "procon.reference = 'adapters_off': must be 'cache' unless model.lora"),
    ("schedule=warmup", ValueError, "exactly one warm-up length"),
    ("log_every=0", ValueError, "train.log_every"),
    ("keep_checkpoints=0", ValueError, "checkpoint.keep_checkpoints"),
    ("name=a/b", ValueError, "train.name"),
    ("name=..", ValueError, "train.name"),
    ("beta2=1.0", ValueError, "optim.beta2"),
    ("safety_samples=-1", ValueError, "data.safety_samples"),
    ("band_fraction=0", ValueError, "procon.band_fraction = 0.0: must be a finite number > 0"),
    ("band_fraction=inf", ValueError, "procon.band_fraction = inf"),
]


@pytest.mark.parametrize("item,error,match", BAD_OVERRIDES)
def test_bad_override(item, error, match):
    with pytest.raises(error, match=match):
        load_config("tiny", ["micro_batch_size=4", item])


def test_overrides_must_be_a_list():
    with pytest.raises(TypeError, match=r"overrides must be a list of 'key=value' strings, got the string 'alpha=0.5'"):
        load_config("tiny", "alpha=0.5")


def test_band_needs_the_reference_cache():
    cfg = load_config("tiny", ["norm=band", "band_fraction=0.02"])
    assert (cfg.procon.norm, cfg.procon.band_fraction) == ("band", 0.02)
    load_config("tiny", ["model.lora=true", "reference=adapters_off", "norm=l1"])
    with pytest.raises(ValueError, match="procon.norm = 'band' needs procon.reference = 'cache', got 'adapters_off'"):
        load_config("tiny", ["model.lora=true", "reference=adapters_off", "norm=band"])


def test_warmup_needs_one_length():
    load_config("tiny", ["schedule=warmup", "alpha_warmup_steps=2"])
    load_config("tiny", ["schedule=warmup", "alpha_warmup_epochs=0.5"])
    with pytest.raises(ValueError, match="exactly one"):
        load_config("tiny", ["schedule=warmup", "alpha_warmup_steps=2", "alpha_warmup_epochs=0.5"])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found.*built-in configs: .*tiny"):
        load_config("no_such_config")


def test_cli_reports_config_errors(capsys, tmp_path):
    assert main(["train", "--config", "tiny", "alpha=abc"]) == 2
    assert "config error: override 'alpha=abc': procon.alpha must be float" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "alpha=0.5", "--print-config"]) == 0
    assert "alpha = 0.5" in capsys.readouterr().out


def test_alpha_schedules():
    wu = AlphaSchedule(ProConConfig(schedule="warmup", alpha=2.0, alpha_after=0.0, alpha_warmup_epochs=1.5),
                       steps_per_epoch=4)
    assert [wu(s) for s in range(8)] == [2.0] * 6 + [0.0] * 2
    s = AlphaSchedule(ProConConfig(schedule="constant", alpha=0.1), steps_per_epoch=4)
    assert {s(i) for i in range(10)} == {0.1}
    off = AlphaSchedule(ProConConfig(schedule="off", alpha=0.1), steps_per_epoch=4)
    assert off(0) == 0.0


def test_warmup_cosine():
    f = WarmupCosine(warmup_steps=3, total_steps=13, min_ratio=0.1)
    assert [f(s) for s in range(3)] == [0.25, 0.5, 0.75]
    assert f(3) == 1.0 and math.isclose(f(8), 0.55) and math.isclose(f(13), 0.1) and math.isclose(f(20), 0.1)


def make_examples(n):
    return [TokenizedExample(f"s{i}", [1] * (2 + i % 5), [-100, 1] + [2] * (i % 5)) for i in range(n)]


def test_batches_cover_each_step_once_for_any_split():
    examples = make_examples(20)
    plans = {(w, m): [StepBatches(examples, batch_size=8, micro_batch_size=m, world_size=w, rank=r, seed=3,
                                  pad_id=0) for r in range(w)] for w, m in [(1, 8), (1, 2), (2, 2), (4, 1), (2, 4)]}
    for step in range(5):   # crosses an epoch boundary (2 steps per epoch)
        seen = {}
        for key, ranks in plans.items():
            ids = sorted(i for plan in ranks for mb in plan.micro_batches(step) for i in mb["ids"])
            seen[key] = ids
            assert len(ids) == 8 and len(set(ids)) == 8
            for plan in ranks:   # each micro-batch padded to its own longest sequence
                for mb in plan.micro_batches(step):
                    assert mb["input_ids"].shape[1] == max(len(examples[int(i[1:])].input_ids) for i in mb["ids"])
        assert len(set(map(tuple, seen.values()))) == 1
    plan = plans[(1, 8)][0]
    assert plan.steps_per_epoch == 2 and plan.position(3) == {"epoch": 1, "index": 8}
    epoch0 = plan.global_indices(0) + plan.global_indices(1)
    assert epoch0 != plan.global_indices(2) + plan.global_indices(3)   # reshuffled per epoch
    again = StepBatches(examples, batch_size=8, micro_batch_size=8, world_size=1, rank=0, seed=3, pad_id=0)
    assert again.global_indices(3) == plan.global_indices(3)           # seeded: same order


def test_batch_plan_errors():
    with pytest.raises(ValueError, match=r"multiple of micro_batch_size x processes = 4 x 2 = 8"):
        StepBatches(make_examples(20), batch_size=4, micro_batch_size=4, world_size=2, rank=0, seed=0, pad_id=0)
    with pytest.raises(ValueError, match="has 5 examples, fewer than one batch"):
        StepBatches(make_examples(5), batch_size=8, micro_batch_size=4, world_size=1, rank=0, seed=0, pad_id=0)


def test_loss_normalisers():
    assert procon_scale(0.5, "sample", world_size=2, n_samples=8, n_response=100) == 0.5 * 2 / 8
    assert procon_scale(0.5, "token", world_size=2, n_samples=8, n_response=100) == 0.5 * 2 / 100
    with pytest.raises(ValueError, match="unknown ProCon reduction"):
        procon_scale(0.5, "layer", world_size=1, n_samples=1, n_response=1)
    # 3 response tokens at input positions; the first position is never predicted
    assert example_counts(TokenizedExample("a", [5, 6, 7, 8], [-100, 6, 7, 8])) == (3, 3)
    assert example_counts(TokenizedExample("b", [5, 6, 7], [5, 6, -100])) == (1, 2)


@pytest.mark.parametrize("section,key,value,match", [
    ("procon", "alpha", math.nan, "procon.alpha = nan: must be a finite number"),
    ("train", "micro_batch_size", 0, "train.micro_batch_size = 0"),
    ("procon", "norm", "l3", "procon.norm = 'l3': expected one of"),
    ("checkpoint", "keep_checkpoints", 0, "checkpoint.keep_checkpoints = 0: must be >= 1"),
])
def test_train_validates_a_config_edited_after_loading(tmp_path, section, key, value, match):
    from fastprocon.train import train
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "schedule=off", "max_steps=1", "export=false"])
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not (tmp_path / "run").exists()   # refused before anything was written
