"""The tokenized-data cache (fastprocon/data_cache.py) and the mapped safetensors files under it:
same samples, ids and hash as plain tokenization; reused; a new file when the data, tokenizer,
template or max_length change; corrupt or stale files named in one line."""
import json
import logging
import os
import re

import numpy as np
import pytest
import torch

from fastprocon import data_cache
from fastprocon.data import (IGNORE_INDEX, TokenizedExample, builtin_path, dataset_hash, load_examples, mix_examples,
                             tokenize_examples)
from fastprocon.data_cache import TokenizedDataset, load_training_set, open_cache
from fastprocon.mapped import ChunkWriter, MappedFile, read_rows
from fastprocon.models import tiny_tokenizer
from fastprocon.train.loss import example_counts

ROWS = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"It is {2 * i}." + " more" * (i % 7)}
        for i in range(40)] + [{"instruction": "Question 3: what is 3 plus 3?", "output": "It is 6."}] * 2


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def plain(path, tok, max_length, **kw):
    return tokenize_examples(load_examples(path), tok, max_length, **kw)[0]


def same_samples(ds: TokenizedDataset, expected: list[TokenizedExample]) -> None:
    assert len(ds) == len(expected)
    for i, ex in enumerate(expected):
        got = ds[i]
        assert (got.id, got.input_ids, got.labels) == (ex.id, ex.input_ids, ex.labels)
        assert (ds.n_predicted[i], ds.n_response[i]) == example_counts(ex) and ds.lengths[i] == len(ex.input_ids)
    assert ds.hash == dataset_hash(expected)


def test_cache_equals_plain_tokenization_and_is_reused(tmp_path, data, tok, monkeypatch):
    ds = load_training_set(data, tok, 80, cache_dir=tmp_path / "cache")
    same_samples(ds, plain(data, tok, 80))
    assert ds.info["n_truncated"] > 0 and ds.info["n_primary"] == len(ROWS)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and ds.path == files[0]

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached data set")
    monkeypatch.setattr(data_cache, "build_cache", no_build)
    again = load_training_set(data, tiny_tokenizer(), 80, cache_dir=tmp_path / "cache")   # a fresh tokenizer object
    same_samples(again, plain(data, tok, 80))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / data.name).write_bytes(data.read_bytes())        # same stem and content: same key
    assert load_training_set(moved / data.name, tok, 80, cache_dir=tmp_path / "cache").hash == ds.hash
    assert [ex.id for ex in ds[1:3]] == [ds[1].id, ds[2].id]     # a slice is a list of samples
    with pytest.raises(TypeError):
        ds["0"]
    assert ds[-1].id == ds[len(ds) - 1].id


def test_cache_is_invalidated_by_file_tokenizer_template_and_max_length(tmp_path, data, tok):
    cache = tmp_path / "cache"
    first = load_training_set(data, tok, 80, cache_dir=cache).path
    other_tok = tiny_tokenizer()
    other_tok.chat_template = other_tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    vocab_tok = tiny_tokenizer()
    vocab_tok.add_tokens(["plus"])
    paths = {first}
    for kwargs, tokenizer in (({}, other_tok), ({}, vocab_tok), ({"skip_bad_rows": True}, tok),
                              ({"drop_overlong_prompts": True}, tok)):
        ds = load_training_set(data, tokenizer, 80, cache_dir=cache, **kwargs)
        same_samples(ds, plain(data, tokenizer, 80))
        paths.add(ds.path)
    ds = load_training_set(data, tok, 128, cache_dir=cache)
    same_samples(ds, plain(data, tok, 128))
    paths.add(ds.path)
    with data.open("a") as f:
        f.write(json.dumps({"instruction": "new", "output": "row"}) + "\n")
    ds = load_training_set(data, tok, 80, cache_dir=cache)
    same_samples(ds, plain(data, tok, 80))
    paths.add(ds.path)
    assert len(paths) == 7 and {p.name for p in cache.iterdir()} == {p.name for p in paths}


def test_safety_mix_and_dropped_prompts_match_the_plain_path(tmp_path, data, tok, caplog):
    safety = builtin_path("safety")
    ds = load_training_set(data, tok, 128, safety=safety, safety_samples=5, seed=3, cache_dir=tmp_path)
    mixed = mix_examples(load_examples(data), load_examples(safety), 5, 3)
    same_samples(ds, tokenize_examples(mixed, tok, 128)[0])
    assert ds.info["n_primary"] == len(ROWS) and len(ds) == len(ROWS) + 5
    other_seed = load_training_set(data, tok, 128, safety=safety, safety_samples=5, seed=4, cache_dir=tmp_path)
    assert other_seed.path != ds.path and [other_seed.id(i) for i in range(5)] != [ds.id(i) for i in range(5)]
    with pytest.raises(ValueError, match=re.escape("safety_samples = 99 but safety has only 32 examples")):
        load_training_set(data, tok, 128, safety=safety, safety_samples=99, cache_dir=tmp_path)
    long = tmp_path / "long.json"
    long.write_text(json.dumps([{"instruction": "short", "output": "ok"}, {"instruction": "long " * 40, "output": "x"}]))
    with pytest.raises(ValueError, match=r"1 example\(s\) have prompts of >= max_length=80"):
        load_training_set(long, tok, 80, cache_dir=tmp_path)
    assert not list(tmp_path.glob("long-*"))                                    # nothing half-written
    with caplog.at_level(logging.WARNING, logger="fastprocon.data"):
        kept = load_training_set(long, tok, 80, drop_overlong_prompts=True, cache_dir=tmp_path)
    same_samples(kept, plain(long, tok, 80, drop_overlong_prompts=True))
    assert len(kept) == 1 and kept.info["n_examples"] == 2 and "dropped" in caplog.text


def test_corrupt_and_stale_cache_files_are_named(tmp_path, data, tok):
    cache = tmp_path / "cache"
    path = load_training_set(data, tok, 80, cache_dir=cache).path
    good = path.read_bytes()
    path.write_bytes(good[:-10])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated.*delete it and it is rebuilt"):
        load_training_set(data, tok, 80, cache_dir=cache)
    other = load_training_set(data, tok, 128, cache_dir=cache).path
    path.write_bytes(other.read_bytes())                                   # a file made for another key
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": stale data cache.*delete it"):
        load_training_set(data, tok, 80, cache_dir=cache)
    path.unlink()
    assert len(load_training_set(data, tok, 80, cache_dir=cache)) == len(ROWS)   # deleted: rebuilt
    with pytest.raises(ValueError, match="corrupt data cache .*offsets"):
        mangled = MappedFile(path, data_cache.CACHE_FORMAT)
        with ChunkWriter(tmp_path / "bad.safetensors") as out:
            for name in data_cache._ARRAYS:
                array = np.asarray(mangled.array(name))
                out.append(name, array[:-1] if name == "tokens" else array)
            out.finish(data_cache.CACHE_FORMAT, mangled.header)
        open_cache(tmp_path / "bad.safetensors")


def test_from_examples_needs_prompt_prefix_labels():
    TokenizedDataset.from_examples([TokenizedExample("a", [1, 2, 3], [IGNORE_INDEX, 2, 3])])
    with pytest.raises(ValueError, match="'b': labels must be -100 on the prompt"):
        TokenizedDataset.from_examples([TokenizedExample("b", [1, 2, 3], [IGNORE_INDEX, 2, IGNORE_INDEX])])


def test_chunk_writer_files_read_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "t.safetensors"
    z = torch.randn(7, 3).bfloat16()
    with ChunkWriter(path) as out:
        out.append("b", np.arange(3, dtype=np.uint8))
        out.append("z", z[:4])
        out.append("z", z[4:])
        out.append("i", np.arange(5, dtype=np.int64))
        assert np.array_equal(out.mapped("i"), np.arange(5))
        with pytest.raises(ValueError, match="do not match"):
            out.append("z", torch.zeros(1, 2).bfloat16())
        out.finish("test.kind", {"x": 1})
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("z"), z) and f.get_tensor("i").tolist() == list(range(5))
    mapped = MappedFile(path, "test.kind")
    assert mapped.header == {"x": 1} and mapped.tag("z") == "BF16"
    assert not list(tmp_path.glob(".t.safetensors.*"))                  # part files removed
    with pytest.raises(ValueError, match="expected a other.kind file"):
        MappedFile(path, "other.kind")


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def test_read_rows_equals_slices_and_keeps_no_mapped_pages(tmp_path):
    """read_rows copies exactly what slicing gives, for maps (finished files and a writer's
    parts, bf16 bits too) and plain arrays, and reads a map's file without mapping its pages."""
    path = tmp_path / "r.safetensors"
    rng = np.random.default_rng(0)
    z = rng.standard_normal((32768, 256)).astype(np.float32)          # 32 MiB
    bf = torch.randn(9, 4).bfloat16()
    with ChunkWriter(path) as out:
        out.append("z", z)
        out.append("b", bf)
        assert np.array_equal(read_rows(out.mapped("z"), 5, 9), z[5:9])
        out.finish("test.kind", {})
    f = MappedFile(path, "test.kind")
    mz, mb = f.array("z"), f.array("b")
    assert np.array_equal(read_rows(mb, 2, 7).view(np.int16), bf[2:7].view(torch.int16).numpy())
    assert read_rows(mz, 3, 3).shape == (0, 256) and np.array_equal(read_rows(z, 1, 4), z[1:4])
    buf = np.empty((10, 256), np.float32)
    assert read_rows(mz, 32758, 32768, out=buf) is buf and np.array_equal(buf, z[-10:])
    with pytest.raises(IndexError, match="out of range"):
        read_rows(mz, 32760, 32769)
    with pytest.raises(ValueError, match="out must be"):
        read_rows(mz, 0, 2, out=buf)
    if not os.path.exists("/proc/self/status"):
        return
    starts = rng.integers(0, 32768 - 4, 2000)
    before = _rss_file()
    for start in starts:
        assert np.array_equal(read_rows(mz, start, start + 4), z[start:start + 4])
    assert _rss_file() - before < 4 << 20         # through the map: up to the 32 MiB file (fault-around)
