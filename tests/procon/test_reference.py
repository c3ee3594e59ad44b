"""Reference projections z0: build, file checks, gather, per-rank shards and their index (tiny model)."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from fastprocon.cli import main
from fastprocon.data.examples import builtin_path, load_examples, load_instructions
from fastprocon.data.tokenize import collate, dataset_hash, tokenize_examples
from fastprocon.models.load import load_model
from fastprocon.procon.reference import ReferenceCache, compute_projections, iter_projections, parse_layers
from fastprocon.procon.reference_files import STORAGE_DTYPES, Z0Files, shard_path, write_index, write_shard
from fastprocon.procon.setup import band_widths
from fastprocon.refusal.directions import directions_hash, extract_directions, save_directions
from fastprocon.refusal.steering import on_layer_inputs
from fastprocon.utils.io import save_safetensors

MAX_LENGTH = 160


@pytest.fixture(scope="module")
def setup():
    loaded = load_model("tiny")
    ds = extract_directions(loaded, load_instructions(builtin_path("harmful"))[:6],
                            load_instructions(builtin_path("harmless"))[:6], batch_size=6)
    tokenized, _ = tokenize_examples(load_examples(builtin_path("benign"))[:10], loaded.tokenizer, MAX_LENGTH)
    return loaded, ds, tokenized


def _load(path, loaded, ds, tokenized, **override):
    expected = dict(model_fingerprint=loaded.fingerprint, directions_hash=directions_hash(ds),
                    dataset_hash=dataset_hash(tokenized), max_length=MAX_LENGTH, layers=ds.defined_layers)
    return ReferenceCache.load(path, **{**expected, **override})


def _direct_z0(loaded, ds, batch, layers):
    """[n_layers, B, T]: HF hidden_states[l] . r_l at response positions, 0 elsewhere."""
    with torch.no_grad():
        hs = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=True).hidden_states
    mask = batch["labels"] != -100
    return torch.stack([(hs[l].float() @ ds.directions[l]) * mask for l in layers])


@pytest.fixture(scope="module")
def cache_file(setup, tmp_path_factory):
    loaded, ds, tokenized = setup
    path = tmp_path_factory.mktemp("ref") / "z0.safetensors"
    report = ReferenceCache.build(loaded, ds, tokenized, None, MAX_LENGTH, path, batch_size=3, progress=False)
    assert report.bytes == path.stat().st_size + shard_path(path, 0, 1).stat().st_size
    assert report.n_samples == len(tokenized)
    assert report.layers == ds.defined_layers == [1, 2, 3]
    assert report.n_tokens == sum(sum(l != -100 for l in ex.labels) for ex in tokenized)
    return path


def test_gather_matches_direct_computation(setup, cache_file):
    loaded, ds, tokenized = setup
    cache = _load(cache_file, loaded, ds, tokenized)
    batch = collate([tokenized[7], tokenized[2], tokenized[4]], loaded.tokenizer.pad_token_id)   # new grouping
    got = cache.gather(batch["ids"], batch["labels"])
    assert got.shape == (3, 3, batch["labels"].shape[1]) and got.dtype == torch.float32
    torch.testing.assert_close(got, _direct_z0(loaded, ds, batch, [1, 2, 3]), rtol=1e-5, atol=1e-5)
    assert torch.all(got[:, batch["labels"] == -100] == 0)


def test_gather_equals_the_recorded_pieces(setup, cache_file):
    """What the old one-file [n_layers, n_tokens] layout stored per sample, gathered from the
    token-major shards in any grouping."""
    loaded, ds, tokenized = setup
    cache = _load(cache_file, loaded, ds, tokenized)
    ids, pieces = compute_projections(loaded, ds, tokenized, [1, 2, 3], batch_size=3)   # as cache_file
    by_id = dict(zip(ids, pieces))
    for group in ([5], [9, 0, 3], list(range(10))[::-1]):
        batch = collate([tokenized[i] for i in group], loaded.tokenizer.pad_token_id)
        got = cache.gather(batch["ids"], batch["labels"])
        mask = batch["labels"] != -100
        for row, i in enumerate(group):
            assert torch.equal(got[:, row, mask[row]], by_id[tokenized[i].id])
    assert tokenized[0].id in cache and "nope" not in cache


def test_gather_reads_the_stored_bits_every_time(setup, cache_file):
    """Gather reads rows from the shard files (not through the maps): repeated and regrouped
    gathers return the bits the memory-mapped shard holds."""
    loaded, ds, tokenized = setup
    cache = _load(cache_file, loaded, ds, tokenized)
    files = cache.files
    shards, rows, _ = files.locate([ex.id for ex in tokenized])
    stored = {ex.id: torch.from_numpy(np.array(files._z0[s][files._offsets[s][r]:files._offsets[s][r + 1]])).T
              for ex, s, r in zip(tokenized, shards.tolist(), rows.tolist())}
    for group in ([3, 1], [1, 3, 8], [1, 3]):
        for _ in range(2):
            batch = collate([tokenized[i] for i in group], loaded.tokenizer.pad_token_id)
            got = cache.gather(batch["ids"], batch["labels"])
            mask = batch["labels"] != -100
            for row, i in enumerate(group):
                assert torch.equal(got[:, row, mask[row]], stored[tokenized[i].id])


def test_layer_subset_and_bf16_storage(setup, cache_file, tmp_path):
    loaded, ds, tokenized = setup
    path = tmp_path / "z0_bf16.safetensors"
    report = ReferenceCache.build(loaded, ds, tokenized, [3, 1], MAX_LENGTH, path, storage_dtype="bf16",
                                  batch_size=4, progress=False)
    assert report.layers == [1, 3] and report.storage_dtype == "bf16"
    cache = _load(path, loaded, ds, tokenized, layers=[1, 3])
    batch = collate(tokenized[:4], loaded.tokenizer.pad_token_id)
    full = _load(cache_file, loaded, ds, tokenized).gather(batch["ids"], batch["labels"])
    got = cache.gather(batch["ids"], batch["labels"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full[[0, 2]].bfloat16().float(), rtol=0, atol=0)


@pytest.mark.parametrize("field,value", [("model_fingerprint", "f" * 64), ("directions_hash", "d" * 64),
                                         ("dataset_hash", "a" * 64), ("max_length", 64), ("layers", [1, 2])])
def test_load_rejects_each_mismatched_field(setup, cache_file, field, value):
    loaded, ds, tokenized = setup
    with pytest.raises(ValueError, match=re.escape(f"{field} expected {value!r}, found")):
        _load(cache_file, loaded, ds, tokenized, **{field: value})


def test_a_max_length_mismatch_is_named_before_the_data_hash(setup, cache_file):
    """Another max_length also changes the data hash: the message names the setting to fix."""
    loaded, ds, tokenized = setup
    with pytest.raises(ValueError, match=re.escape("max_length expected 64, found")):
        _load(cache_file, loaded, ds, tokenized, max_length=64, dataset_hash="a" * 64)


def test_load_missing_corrupt_and_wrong_kind_files(setup, cache_file, tmp_path):
    loaded, ds, tokenized = setup
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        _load(tmp_path / "nope.safetensors", loaded, ds, tokenized)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(cache_file.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        _load(broken, loaded, ds, tokenized)
    directions = tmp_path / "directions.safetensors"
    save_directions(ds, directions)
    with pytest.raises(ValueError, match="expected a fastprocon.reference-index file"):
        _load(directions, loaded, ds, tokenized)
    old = tmp_path / "old.safetensors"
    save_safetensors(old, {"z0": torch.zeros(2, 5), "offsets": torch.tensor([0, 2, 5])}, "fastprocon.reference",
                     {"ids": ["a", "b"]})
    with pytest.raises(ValueError, match="old.safetensors: a reference cache in the old single-file layout; rebuild"):
        _load(old, loaded, ds, tokenized)
    shard = shard_path(cache_file, 0, 1)
    truncated = tmp_path / cache_file.name
    truncated.write_bytes(cache_file.read_bytes())
    shard_path(truncated, 0, 1).write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ValueError, match=re.escape(str(shard_path(truncated, 0, 1))) + ": not a readable"):
        _load(truncated, loaded, ds, tokenized)


def test_a_missing_or_foreign_shard_is_named(setup, cache_file, tmp_path):
    loaded, ds, tokenized = setup
    path = tmp_path / "z0.safetensors"
    ReferenceCache.build(loaded, ds, tokenized[:4], None, MAX_LENGTH, path, batch_size=4, progress=False)
    shard = shard_path(path, 0, 1)
    shard.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError) as err:
        _load(path, loaded, ds, tokenized[:4])
    assert str(err.value).count("\n") == 0 and f"shard {shard} is missing" in str(err.value)
    shutil.copy(shard_path(cache_file, 0, 1), shard)                     # another build's shard
    with pytest.raises(ValueError, match=re.escape(f"{shard}: belongs to another build of {path}")):
        _load(path, loaded, ds, tokenized[:4])


def test_gather_errors(setup, cache_file):
    loaded, ds, tokenized = setup
    cache = _load(cache_file, loaded, ds, tokenized)
    batch = collate(tokenized[:2], loaded.tokenizer.pad_token_id)
    with pytest.raises(KeyError, match="'benign:unknown' is not in the reference cache"):
        cache.gather([batch["ids"][0], "benign:unknown"], batch["labels"])
    labels = batch["labels"].clone()
    labels[0, labels[0] != -100] = -100                                     # other tokenization of the sample
    with pytest.raises(ValueError, match=f"{batch['ids'][0]!r} has 0 response tokens in the batch"):
        cache.gather(batch["ids"], labels)
    with pytest.raises(ValueError, match="B = len\\(ids\\) = 1"):
        cache.gather(batch["ids"][:1], batch["labels"])


def test_per_rank_shards_and_index_equal_the_single_process_cache(setup, cache_file, tmp_path):
    loaded, ds, tokenized = setup
    path, world = tmp_path / "sharded.safetensors", 2
    header = {**_load(cache_file, loaded, ds, tokenized).header, "build_id": "b1"}
    for rank in range(world):   # what each rank of a torchrun build writes
        write_shard(path, iter_projections(loaded, ds, tokenized, [1, 2, 3], batch_size=2,
                                           indices=range(rank, len(tokenized), world)), header, rank, world)
    size = write_index(path, world)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["sharded.safetensors", "sharded.shard0-of-2.safetensors", "sharded.shard1-of-2.safetensors"]
    assert size == sum((tmp_path / n).stat().st_size for n in names)
    sharded, single = _load(path, loaded, ds, tokenized), _load(cache_file, loaded, ds, tokenized)
    assert len(sharded) == len(single) == len(tokenized)
    batch = collate(tokenized, loaded.tokenizer.pad_token_id)
    torch.testing.assert_close(sharded.gather(batch["ids"], batch["labels"]),
                               single.gather(batch["ids"], batch["labels"]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_layer_std_is_the_same_for_any_number_of_shards(setup, cache_file, tmp_path, storage):
    """The band's widths come from layer_std: the std of z0 over all tokens, per layer, the same
    bits whether 1 or 3 processes built the cache (and float64-accurate)."""
    loaded, ds, tokenized = setup
    header = {**_load(cache_file, loaded, ds, tokenized).header, "storage_dtype": storage}
    g = torch.Generator().manual_seed(5)
    ids = [f"sample-{i}" for i in range(23)]
    pieces = [torch.randn(3, int(n), generator=g) * torch.tensor([[0.1], [3.0], [40.0]]) + 7.0
              for n in torch.randint(0, 9, (len(ids),), generator=g)]
    stds = []
    for world in (1, 3):
        path = tmp_path / f"w{world}.safetensors"
        for rank in range(world):
            mine = list(range(rank, len(ids), world))[::-1]    # each rank's own order
            write_shard(path, [([ids[i] for i in mine], [pieces[i] for i in mine])],
                        {**header, "build_id": f"w{world}"}, rank, world)
        write_index(path, world)
        stds.append(ReferenceCache(Z0Files(path)).layer_std())
    np.testing.assert_array_equal(stds[0], stds[1])
    stored = torch.cat(pieces, dim=1).to(STORAGE_DTYPES[storage]).double()
    np.testing.assert_allclose(stds[0], stored.std(dim=1, correction=0).numpy(), rtol=1e-12)


def test_band_widths(setup, cache_file):
    loaded, ds, tokenized = setup
    cache = _load(cache_file, loaded, ds, tokenized)
    widths = band_widths(cache, [1, 2, 3], 0.05)
    assert widths.dtype == torch.float32 and torch.equal(widths, torch.from_numpy(0.05 * cache.layer_std()).float())
    assert (widths > 0).all()
    with pytest.raises(ValueError, match=r"covers layers \[1, 2, 3\], not the constrained layers \[1, 2\]"):
        band_widths(cache, [1, 2], 0.05)
    cache.layer_std = lambda: np.array([0.1, 0.0, np.nan])
    with pytest.raises(ValueError, match=r"no spread \(std 0 or not finite\) at layer\(s\) \[2, 3\]"):
        band_widths(cache, [1, 2, 3], 0.05)


def test_ranks_with_fewer_samples_run_as_many_forwards(setup):
    """A sharded (FSDP) model needs every rank to run the same number of forwards."""
    loaded, ds, tokenized = setup
    calls = []
    with on_layer_inputs(loaded.model, lambda l, x: calls.append(l), [1]):
        ids, pieces = compute_projections(loaded, ds, tokenized[:3], [1, 2, 3], batch_size=2, min_batches=4)
        assert len(calls) == 4 and len(ids) == len(pieces) == 3
        plain_ids, plain = compute_projections(loaded, ds, tokenized[:3], [1, 2, 3], batch_size=2)
        assert plain_ids == ids and all(torch.equal(a, b) for a, b in zip(plain, pieces))
        calls.clear()
        assert compute_projections(loaded, ds, [], [1, 2, 3], batch_size=2, min_batches=2) == ([], [])
        assert len(calls) == 2


def test_index_rejects_disagreeing_or_overlapping_shards(setup, cache_file, tmp_path):
    loaded, ds, tokenized = setup
    header = {**_load(cache_file, loaded, ds, tokenized).header, "build_id": "b1"}
    batches = [compute_projections(loaded, ds, tokenized[:3], [1, 2, 3], batch_size=3)]
    write_shard(tmp_path / "a", batches, header, 0, 2)
    write_shard(tmp_path / "a", batches, {**header, "max_length": 99}, 1, 2)
    with pytest.raises(ValueError, match="cannot index .*a.shard1-of-2: max_length is 99"):
        write_index(tmp_path / "a", 2)
    write_shard(tmp_path / "a", batches, header, 1, 2)
    with pytest.raises(ValueError, match="duplicate sample id"):
        write_index(tmp_path / "a", 2)


def test_build_and_layer_errors(setup, tmp_path):
    loaded, ds, tokenized = setup
    with pytest.raises(ValueError, match="max_length=16"):
        ReferenceCache.build(loaded, ds, tokenized, None, 16, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="storage_dtype"):
        ReferenceCache.build(loaded, ds, tokenized, None, MAX_LENGTH, tmp_path / "x", storage_dtype="fp8")
    assert parse_layers("all", ds) == [1, 2, 3] and parse_layers("3, 1", ds) == [1, 3]
    with pytest.raises(ValueError, match="layer\\(s\\) \\[0\\] have no refusal direction"):
        parse_layers("0,1", ds)
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("1,9", ds)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layers("first", ds)


def test_reference_cli(setup, tmp_path):
    loaded, ds, _ = setup
    directions = tmp_path / "d.safetensors"
    save_directions(ds, directions)
    out = tmp_path / "z0.safetensors"
    assert main(["reference", "--model", "tiny", "--directions", str(directions), "--data", "benign",
                 "--max-length", "128", "--layers", "1,3", "--storage-dtype", "bf16", "--out", str(out)]) == 0
    tokenized, _ = tokenize_examples(load_examples(builtin_path("benign")), loaded.tokenizer, 128)
    cache = _load(out, loaded, ds, tokenized, max_length=128, layers=[1, 3])
    assert len(cache) == len(tokenized) and cache.header["storage_dtype"] == "bf16"


def test_reference_cli_overlong_prompts(setup, tmp_path, capsys):
    loaded, ds, _ = setup
    directions = tmp_path / "d.safetensors"
    save_directions(ds, directions)
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": "short", "output": "ok"},
                                {"instruction": "long " * 100, "output": "never seen"}]))
    args = ["reference", "--model", "tiny", "--directions", str(directions), "--data", str(data),
            "--max-length", "48", "--out", str(tmp_path / "z0.safetensors")]
    assert main(args) == 2
    assert re.search(r"fastprocon reference: error: .*prompts of >= max_length=48.*--drop-overlong-prompts",
                     capsys.readouterr().err)
    assert main(args + ["--drop-overlong-prompts"]) == 0
    cache = ReferenceCache.load(tmp_path / "z0.safetensors", model_fingerprint=None, directions_hash=None,
                                dataset_hash=None, max_length=48, layers=None)
    assert len(cache) == 1


def test_reference_cli_refuses_to_write_an_empty_cache(setup, tmp_path, capsys):
    _, ds, _ = setup
    directions = tmp_path / "d.safetensors"
    save_directions(ds, directions)
    out = tmp_path / "z0.safetensors"
    assert main(["reference", "--model", "tiny", "--directions", str(directions), "--data", "benign",
                 "--max-length", "20", "--drop-overlong-prompts", "--out", str(out)]) == 2
    assert re.search(r"all 48 examples of .*benign.json were dropped by --drop-overlong-prompts.*"
                     r"--max-length=20", capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(ValueError, match="no samples to record"):
        ReferenceCache.build(setup[0], ds, [], None, MAX_LENGTH, out, progress=False)
