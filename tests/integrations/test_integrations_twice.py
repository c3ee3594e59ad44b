"""ProCon added twice to one model or one Trainer is refused (a second set of hooks would add the
penalty's gradient twice while the logged value stayed the same)."""
import importlib.util

import pytest

from fastprocon.integrations import ProCon
from fastprocon.models.load import load_model

HAVE_TRL = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


@pytest.fixture(scope="module")
def directions(tmp_path_factory):
    path = tmp_path_factory.mktemp("dirs") / "directions.safetensors"
    loaded = load_model("tiny")
    ProCon(loaded.model, loaded.tokenizer, directions=str(path)).remove()
    return path


def test_a_second_procon_on_one_model_is_refused_until_the_first_is_removed(directions):
    loaded = load_model("tiny")
    first = ProCon(loaded.model, loaded.tokenizer, directions=str(directions))
    with pytest.raises(ValueError, match=r"this model already has ProCon hooks \(a ProCon made earlier\); call "
                                         r"\.remove\(\) on that one first"):
        ProCon(loaded.model, loaded.tokenizer, directions=str(directions), alpha=0.5)
    first.remove()
    ProCon(loaded.model, loaded.tokenizer, directions=str(directions)).remove()


@pytest.mark.skipif(not HAVE_TRL, reason="trl and datasets not installed")
def test_add_procon_twice_on_one_trainer_is_refused(tmp_path, directions):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fastprocon.integrations import add_procon
    loaded = load_model("tiny")
    rows = [{"prompt": [{"role": "user", "content": f"say {i}"}],
             "completion": [{"role": "assistant", "content": f"{i}"}]} for i in range(8)]
    config = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                       save_strategy="no", report_to=[], use_cpu=True, max_length=64, seed=0, bf16=False)
    trainer = SFTTrainer(model=loaded.model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=loaded.tokenizer)
    add_procon(trainer, alpha=1.0, directions=str(directions))
    with pytest.raises(ValueError, match=r"add_procon: this trainer already has ProCon \(an earlier add_procon "
                                         r"call\)"):
        add_procon(trainer, alpha=1.0, directions=str(directions))
