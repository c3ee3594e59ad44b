"""The z0 cache's storage dtype is part of what a run asks for: a cache stored in another dtype
than procon.reference_dtype (e.g. a bf16 cache in a run that asks for fp32 z0) is refused, naming
the file and both dtypes; the integrations record z0 in the dtype they are given."""
import pytest

from fastprocon.train import load_config, train


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bf16")
    train(load_config("tiny", [f"run_dir={run_dir}", "max_steps=1", "export=false", "reference_dtype=bf16"]))
    return run_dir


def test_a_bf16_cache_in_a_run_asking_for_fp32_is_refused(bf16_run, tmp_path):
    cache = bf16_run / "reference.safetensors"
    common = [f"run_dir={tmp_path / 'run'}", "max_steps=1", "export=false",
              f"directions={bf16_run / 'directions.safetensors'}", f"reference_cache={cache}"]
    with pytest.raises(ValueError, match=rf"reference cache {cache} stores z0 in bf16, this run asks for fp32 "
                                         r"\(procon.reference_dtype\)"):
        train(load_config("tiny", common))
    assert train(load_config("tiny", [*common, "reference_dtype=bf16"])).final_step == 1   # explicit: used


def test_the_integration_records_z0_in_the_dtype_it_is_given(tmp_path):
    from fastprocon.data.examples import load_examples, resolve_data_path
    from fastprocon.data.tokenize import collate, tokenize_examples
    from fastprocon.integrations import ProCon
    from fastprocon.models.load import load_model
    from fastprocon.procon.reference_files import Z0Files

    loaded = load_model("tiny")
    examples, _ = tokenize_examples(load_examples(resolve_data_path("benign"))[:4], loaded.tokenizer, 64)
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    cache = tmp_path / "z0.safetensors"
    procon = ProCon(loaded.model, loaded.tokenizer, directions=str(tmp_path / "d.safetensors"),
                    reference_cache=str(cache), reference_dtype="bf16")
    procon.record_reference([{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}])
    procon.remove()
    assert Z0Files(cache).header["storage_dtype"] == "bf16"
