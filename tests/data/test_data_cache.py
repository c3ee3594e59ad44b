"""The tokenized-data cache (fastprocon/data/cache.py) and the mapped safetensors files under it:
same samples, ids and hash as plain tokenization; reused; a new file when the data, tokenizer,
template or max_length change; corrupt or stale files named in one line."""
import datetime
import json
import logging
import os
import re

import numpy as np
import pytest
import torch

from fastprocon.data import cache as data_cache
from fastprocon.data.cache import TokenizedDataset, load_training_set, open_cache
from fastprocon.data.examples import IGNORE_INDEX, builtin_path, load_examples, load_examples_report, mix_examples
from fastprocon.data.tokenize import TokenizedExample, dataset_hash, tokenize_examples
from fastprocon.models.specs import tiny_tokenizer
from fastprocon.train.loss import example_counts
from fastprocon.utils.mapped import ChunkWriter, MappedFile, read_rows

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
    long.write_text(json.dumps([{"instruction": "short", "output": "ok"},
                                {"instruction": "long " * 40, "output": "x"}]))
    with pytest.raises(ValueError, match=r"1 example\(s\) have prompts of >= max_length=80"):
        load_training_set(long, tok, 80, cache_dir=tmp_path)
    assert not list(tmp_path.glob("long-*"))                                    # nothing half-written
    with caplog.at_level(logging.WARNING, logger="fastprocon.data.examples"):
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


# ---------------------------------------------------------------------------------------------
# The streamed build (a .jsonl file read chunk by chunk) writes what the whole-list build wrote
# ---------------------------------------------------------------------------------------------

def _whole_list_examples(sources, skip_bad_rows, safety_samples, seed):
    """make_examples as load_training_set had it before the build streamed (the whole list)."""
    def make_examples():
        reports = [load_examples_report(p, skip_bad_rows=skip_bad_rows) for p in sources]
        examples = reports[0].examples
        if safety_samples > 0:
            examples = mix_examples(examples, reports[1].examples, safety_samples, seed)
        skipped = [message for r in reports for message in r.skipped]
        return examples, {"n_rows": sum(r.n_rows for r in reports), "n_primary": len(reports[0].examples),
                          "n_examples": len(examples), "n_skipped": len(skipped),
                          "first_skipped": skipped[0] if skipped else None}
    return make_examples


class _FixedTime(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5, tzinfo=tz)


def _odd_rows(path, extra=()):
    good = ROWS[:12] + [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello."}]},
                        {"prompt": "long " * 10, "completion": "short " * 40},     # truncated at 160
                        {"prompt": "p" * 300, "completion": "c"},                 # dropped (prompt too long)
                        {"question": "q?", "answer": "long answer " * 50}]           # truncated
    lines = ["\ufeff" + json.dumps(good[0])] + [json.dumps(r) for r in good[1:6]] + [
        "{not json", "", "   ", json.dumps({"instruction": "x"}), json.dumps({"instruction": 3, "output": "y"}),
        json.dumps(good[6]) + "\r"] + [json.dumps(r) for r in good[7:]] + [json.dumps(good[2])] * 3 + [
        json.dumps(r) for r in extra] + ["[1, 2]"]
    path.write_bytes("\n".join(lines).encode())          # no newline after the last line
    return path


@pytest.mark.parametrize("mix", [0, 5, 7])
def test_streamed_build_writes_the_whole_list_builds_file_byte_for_byte(tmp_path, tok, monkeypatch, mix):
    """Bad rows skipped, empty lines, a byte-order mark, CR, repeated rows (#n ids), truncated rows,
    the safety mix; mix=7: a safety file with the same stem sharing rows (ids collide across files)."""
    monkeypatch.setattr(data_cache, "datetime", _FixedTime)
    monkeypatch.setattr(data_cache, "CHUNK", 4)                 # several chunks, with and without the mix
    data = _odd_rows(tmp_path / "rows.jsonl")
    if mix == 7:
        (tmp_path / "s").mkdir()
        safety = _odd_rows(tmp_path / "s" / "rows.jsonl", extra=ROWS[30:34])
    else:
        safety = builtin_path("safety")
    kwargs = dict(skip_bad_rows=True, safety=safety, safety_samples=mix, seed=3)
    new = load_training_set(data, tok, 160, cache_dir=tmp_path / "new", drop_overlong_prompts=True, **kwargs)
    sources, settings = [data], {"skip_bad_rows": True}
    if mix:
        sources.append(safety)
        settings.update(safety_samples=mix, seed=3)
    old = data_cache.load_tokenized(sources, _whole_list_examples(sources, True, mix, 3), tok, 160,
                                    drop_overlong_prompts=True, settings=settings, cache_dir=tmp_path / "old")
    assert new.path.name == old.path.name and new.path.read_bytes() == old.path.read_bytes()
    assert new.info["n_skipped"] == (4 if mix != 7 else 8) and new.info["n_truncated"] >= 2
    assert new.info["first_skipped"].startswith(f"{data} line 7: invalid JSON")
    if mix == 7:
        ids = [new.id(i) for i in range(len(new))]
        assert len(set(ids)) == len(ids) and sum("#" in i for i in ids) > 3    # safety rows renamed past the primary's
    with pytest.raises(ValueError, match=re.escape(f"{data} line 7: invalid JSON")):
        load_training_set(data, tok, 160, cache_dir=tmp_path / "new")


def test_streamed_scan_errors_equal_the_whole_file_reads(tmp_path):
    from fastprocon.data.examples import scan_jsonl

    def both(content: bytes, **kw):
        path = tmp_path / "e.jsonl"
        path.write_bytes(content)
        errors = []
        for load in (load_examples_report, scan_jsonl):
            with pytest.raises(ValueError) as err:
                load(path, **kw)
            errors.append(str(err.value))
        assert errors[0] == errors[1]
        return errors[0]

    row = json.dumps(ROWS[0]).encode()
    assert "line 2: missing field" in both(row + b'\n{"instruction": "x"}\n' + row)
    assert "no valid rows (2 read, 2 bad)" in both(b"[]\n\n{\n", skip_bad_rows=True)
    for bad in (b"\xff", b"\xe2\x82\n" + row, b"\xe2\x82"):        # the last: at the end of the file
        assert "not UTF-8 text" in both(b"\xef\xbb\xbf" + row + b"\n{bad\n" + row + bad)
        assert "not UTF-8 text" in both(row + b"\n" + row[:9] + bad, skip_bad_rows=True)


def test_streamed_build_memory_is_bounded_by_the_chunk_not_the_file(tmp_path, monkeypatch):
    """The build's peak resident growth (VmHWM, reset through /proc/self/clear_refs, as
    benchmarks/bench_data.py measures it) stays far below the file's size: the whole-list build
    held at least the file's decoded text and every parsed row (> 2x the file)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("no /proc/self/clear_refs to reset the peak resident set")

    class CountTokenizer:           # one token a text: the test measures the rows, not a tokenizer
        chat_template, special_tokens_map, eos_token_id = "count", {}, 1

        def get_vocab(self):
            return {"<eos>": 1}

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
            return text + "<assistant>" if add_generation_prompt else text

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[2 + len(t) % 50] for t in texts]}

    data = tmp_path / "big.jsonl"
    filler = "lorem ipsum dolor sit amet " * 75     # ~4 kB a row, 78 MiB: the whole-list build peaked at +241 MiB
                                                     # here, the streamed one at +2.4 MiB (CHUNK 256; 38 MiB at 4096)
    with data.open("w") as f:
        for i in range(20_000):
            f.write(json.dumps({"instruction": f"Question {i}: {filler}", "output": f"{i} {filler}"}) + "\n")
    size = data.stat().st_size
    monkeypatch.setattr(data_cache, "CHUNK", 256)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    load_training_set(small, CountTokenizer(), 64, cache_dir=tmp_path / "cache")     # imports done before measuring

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    ds = load_training_set(data, CountTokenizer(), 64, cache_dir=tmp_path / "cache")
    growth = status("VmHWM") - before
    assert len(ds) == 20_000 and ds.id(19_999).startswith("big:")
    assert growth < size / 8, f"peak grew {growth / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"
