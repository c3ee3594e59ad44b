"""fastprocon.data.examples: row formats, errors, ids, tokenization with response-only labels, collate, mixing."""
import json
import logging
from pathlib import Path

import pytest
import torch

from fastprocon.data.examples import (
    BUILTIN_SETS,
    IGNORE_INDEX,
    Example,
    builtin_path,
    load_examples,
    load_examples_report,
    load_instructions,
    mix_examples,
    resolve_data_path,
)
from fastprocon.data.tokenize import TokenizedExample, collate, dataset_hash, format_prompt, tokenize_examples
from fastprocon.models.specs import tiny_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REFUSAL_PHRASES = ("i'm sorry", "i am sorry", "i apologize", "i cannot", "i can't", "i am unable", "i'm unable")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Row formats and ids
# ---------------------------------------------------------------------------------------------

def test_every_row_format(tmp_path):
    rows = [
        {"instruction": "Add 2 and 3.", "output": "5"},
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
        {"instruction": "Name a color.", "input": "", "output": "red"},
        {"instruction": "Name a fruit.", "input": None, "output": "apple"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky color?"},
                      {"role": "assistant", "content": "Blue."}]},
        {"prompt": "2+2?", "completion": "4"},
        {"question": "How many legs has a cat?", "answer": "4\n#### 4"},
    ]
    from_json = load_examples(write_json(tmp_path / "mixed.json", rows))
    from_jsonl = load_examples(write_jsonl(tmp_path / "mixed.jsonl", [json.dumps(r) for r in rows]))
    assert [(e.prompt, e.response, e.system) for e in from_json] == [
        ("Add 2 and 3.", "5", None), ("Translate.\n\nbonjour", "hello", None), ("Name a color.", "red", None),
        ("Name a fruit.", "apple", None), ("Hi", "Hello!", None), ("Sky color?", "Blue.", "Be brief."),
        ("2+2?", "4", None), ("How many legs has a cat?", "4\n#### 4", None)]
    assert [e.id for e in from_json] == [e.id for e in from_jsonl]   # ids come from content and stem
    assert all(e.id.startswith("mixed:") for e in from_json)


def test_ids_are_stable_under_reordering_and_unique(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)] + [{"prompt": "p0", "completion": "c0"}]
    ids = {(e.prompt, e.response, e.id) for e in load_examples(write_json(tmp_path / "a.json", rows))}
    reordered = {(e.prompt, e.response, e.id) for e in load_examples(write_json(tmp_path / "a.json", rows[::-1]))}
    assert ids == reordered
    examples = load_examples(tmp_path / "a.json")
    assert len({e.id for e in examples}) == 6
    assert sum(e.id.endswith("#1") for e in examples) == 1


# ---------------------------------------------------------------------------------------------
# Malformed rows
# ---------------------------------------------------------------------------------------------

BAD_JSONL_LINES = [
    ('{"instruction": "x"}', "line 2: missing field 'output'"),
    ('{"instruction": "x", "output": 5}', "line 2: field 'output' must be a string, got int"),
    ('{"prompt": "x", "completion": "   "}', "line 2: field 'completion' is empty"),
    ('["not", "an", "object"]', "line 2: a row must be a JSON object, got list"),
    ('{"instruction": "x", "output": "y"', "line 2: invalid JSON"),
    ('{"text": "x"}', "line 2: unrecognised row with fields \\['text'\\]"),
    ('{"question": "q"}', "line 2: missing field 'answer'"),
    ('{"messages": [{"role": "user", "content": "a"}]}',
     r"line 2: field 'messages' must be \[system\?, user, assistant\]"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}', r"line 2: .*\(single turn\)"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}',
     r"line 2 messages\[0\]: missing field 'content'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
     "line 2: the assistant message's 'content' is empty"),
    ('{"messages": "hi"}', "line 2: field 'messages' must be a list, got str"),
]


@pytest.mark.parametrize("bad_line, match", BAD_JSONL_LINES)
def test_malformed_jsonl_row_names_file_line_and_field(tmp_path, bad_line, match):
    good = '{"prompt": "p", "completion": "c"}'
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad_line, good])
    with pytest.raises(ValueError, match=f"rows.jsonl {match}"):
        load_examples(path)
    report = load_examples_report(path, skip_bad_rows=True)
    assert (report.n_rows, len(report.skipped), len(report.examples)) == (3, 1, 2)


def test_malformed_json_item_and_file_errors(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}]
    with pytest.raises(ValueError, match=r"rows.json item \[1\]: missing field 'output'"):
        load_examples(write_json(tmp_path / "rows.json", rows))
    with pytest.raises(ValueError, match="must hold a list of rows, got dict"):
        load_examples(write_json(tmp_path / "obj.json", {"instruction": "a", "output": "b"}))
    (tmp_path / "broken.json").write_text('[{"a": 1},\n  {"b": }]')
    with pytest.raises(ValueError, match="broken.json: invalid JSON at line 2"):
        load_examples(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        load_examples(tmp_path / "rows.csv")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_examples(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no valid rows"):
        load_examples(write_json(tmp_path / "empty.json", []))


def test_skip_bad_rows_counts_and_logs(tmp_path, caplog):
    lines = ['{"prompt": "p1", "completion": "c1"}', "{oops", '{"prompt": "p2"}', "",
             '{"prompt": "p3", "completion": "c3"}', "7"]
    path = write_jsonl(tmp_path / "rows.jsonl", lines)
    report = load_examples_report(path, skip_bad_rows=True)
    assert report.n_rows == 5 and len(report.examples) == 2 and len(report.skipped) == 3
    assert [m.split(": ")[0][-6:] for m in report.skipped] == ["line 2", "line 3", "line 6"]
    with caplog.at_level(logging.WARNING, logger="fastprocon.data.examples"):
        assert len(load_examples(path, skip_bad_rows=True)) == 2
    assert "skipped 3 of 5 rows" in caplog.text


def test_load_instructions(tmp_path):
    rows = ["Plain string.", {"instruction": "With category.", "category": None},
            {"instruction": "With input.", "input": "data"}]
    assert load_instructions(write_json(tmp_path / "i.json", rows)) == [
        "Plain string.", "With category.", "With input.\n\ndata"]
    assert load_instructions(write_jsonl(tmp_path / "i.jsonl", ['"a"', '{"instruction": "b"}'])) == ["a", "b"]
    for bad, match in [(["ok", ""], r"item \[1\]: empty instruction"),
                       ([{"prompt": "x"}], "missing field 'instruction'"),
                       ([3], "must be a string or an object, got int"), ([{"instruction": 1}], "must be a string")]:
        with pytest.raises(ValueError, match=match):
            load_instructions(write_json(tmp_path / "bad.json", bad))


def test_builtin_sets():
    counts = {name: len(json.loads(builtin_path(name).read_text())) for name in BUILTIN_SETS}
    assert counts == {"benign": 48, "safety": 32, "harmful": 32, "harmless": 32, "harmful_eval": 12,
                      "harmless_eval": 12}
    assert len(load_examples(builtin_path("benign"))) == 48
    safety = load_examples(builtin_path("safety"))
    assert all(any(p in e.response.lower() for p in REFUSAL_PHRASES) for e in safety)
    harmful = set(load_instructions(builtin_path("harmful")))
    held_out = set(load_instructions(builtin_path("harmful_eval")))
    assert not harmful & held_out and not {e.prompt for e in safety} & held_out
    assert not set(load_instructions(builtin_path("harmless"))) & set(load_instructions(builtin_path("harmless_eval")))
    assert resolve_data_path("benign") == builtin_path("benign")
    with pytest.raises(ValueError, match="unknown built-in data set 'nope'; available: benign"):
        builtin_path("nope")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        resolve_data_path("nope")
    with pytest.raises(FileNotFoundError, match=r"data file .* is a directory: give a \.json or \.jsonl file"):
        resolve_data_path(builtin_path("benign").parent)


# ---------------------------------------------------------------------------------------------
# Tokenization, collate, mixing, hash
# ---------------------------------------------------------------------------------------------

def labelled_text(tok, ex: TokenizedExample) -> str:
    return tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX])


def test_labels_cover_exactly_the_response_and_end_of_turn(tok):
    examples = [Example("a", "What is 2+2?", "It is 4."), Example("b", "Hi", "Hello there!", system="Be nice.")]
    tokenized, n_truncated = tokenize_examples(examples, tok, max_length=512)
    assert n_truncated == 0
    for ex, t in zip(examples, tokenized):
        assert labelled_text(tok, t) == ex.response + tok.eos_token
        n_prompt = t.labels.index(next(l for l in t.labels if l != IGNORE_INDEX))
        assert all(l == IGNORE_INDEX for l in t.labels[:n_prompt])
        assert t.labels[n_prompt:] == t.input_ids[n_prompt:]
        assert tok.decode(t.input_ids[:n_prompt]) == format_prompt(tok, ex.prompt, ex.system)
    assert format_prompt(tok, "x").endswith("<|im_start|>assistant\n")


def test_eos_appended_when_template_has_none(tok):
    bare = tiny_tokenizer()
    bare.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    (t,), _ = tokenize_examples([Example("a", "Hi", "Yo")], bare, max_length=64)
    assert labelled_text(bare, t) == "Yo\n" + bare.eos_token


def test_truncation_is_counted(tok):
    prompt_len = len(tok(format_prompt(tok, "Q"), add_special_tokens=False)["input_ids"])
    examples = [Example("short", "Q", "ok"), Example("long", "Q", "x" * 100)]
    tokenized, n_truncated = tokenize_examples(examples, tok, max_length=prompt_len + 10)
    assert n_truncated == 1
    assert [len(t.input_ids) for t in tokenized] == [prompt_len + 3, prompt_len + 10]
    assert labelled_text(tok, tokenized[1]) == "x" * 10


def test_prompt_filling_max_length_is_an_error_or_dropped(tok, caplog):
    examples = [Example("fits", "Q", "A"), Example("overlong", "Q" * 50, "A")]
    with pytest.raises(ValueError, match=r"1 example\(s\) have prompts of >= max_length=30 tokens.*overlong"):
        tokenize_examples(examples, tok, max_length=30)
    with caplog.at_level(logging.WARNING, logger="fastprocon.data.examples"):
        kept, _ = tokenize_examples(examples, tok, max_length=30, drop_overlong_prompts=True)
    assert [t.id for t in kept] == ["fits"] and "overlong" in caplog.text
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        tokenize_examples(examples, tok, max_length=1)


def test_collate_pads_right_to_batch_max(tok):
    batch = [TokenizedExample("a", [5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample("b", [8], [8])]
    out = collate(batch, pad_id=0)
    assert out["ids"] == ["a", "b"]
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(out[k].dtype == torch.long for k in ("input_ids", "attention_mask", "labels"))
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)


def test_mix_is_deterministic_by_seed():
    primary = [Example(f"p{i}", f"p{i}", "r") for i in range(20)]
    extra = [Example(f"e{i}", f"e{i}", "r") for i in range(30)]
    mixed = mix_examples(primary, extra, k=7, seed=3)
    assert [e.id for e in mixed] == [e.id for e in mix_examples(primary, extra, k=7, seed=3)]
    assert [e.id for e in mixed] != [e.id for e in mix_examples(primary, extra, k=7, seed=4)]
    assert len(mixed) == 27 and sum(e.id.startswith("e") for e in mixed) == 7
    assert {e.id for e in primary} <= {e.id for e in mixed}
    for k in (31, -1):
        with pytest.raises(ValueError, match=f"cannot mix in k={k} examples from a set of 30"):
            mix_examples(primary, extra, k=k, seed=0)
    clash = mix_examples([Example("x", "a", "b"), Example("x#1", "c", "d")], [Example("x", "a", "b")], k=1, seed=0)
    assert sorted(e.id for e in clash) == ["x", "x#1", "x#2"]


def test_dataset_hash_is_order_free_and_content_sensitive(tok):
    tokenized, _ = tokenize_examples(load_examples(builtin_path("benign"))[:6], tok, max_length=128)
    h = dataset_hash(tokenized)
    assert dataset_hash(tokenized[::-1]) == h
    changed = [TokenizedExample(t.id, t.input_ids, list(t.labels)) for t in tokenized]
    changed[2].labels[-1] = IGNORE_INDEX
    assert dataset_hash(changed) != h
    assert dataset_hash(tokenized[:5]) != h


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_shared_data_files_load():
    assert len(load_examples(SHARED_DATA / "gsm8k" / "test.jsonl")) == 1319
    safety = load_examples(SHARED_DATA / "safety" / "safety_only.json")
    assert len(safety) == 2483 and len({e.id for e in safety}) == 2483
    assert len(load_instructions(SHARED_DATA / "direction" / "harmful_val.json")) == 39


def test_jsonl_line_numbers_ignore_unicode_line_separators(tmp_path):
    lines = [json.dumps({"prompt": "a\u2028b", "completion": "c"}, ensure_ascii=False), '{"prompt": "p"}']
    with pytest.raises(ValueError, match="u.jsonl line 2: missing field 'completion'"):
        load_examples(write_jsonl(tmp_path / "u.jsonl", lines))


def test_non_utf8_file_names_the_file_and_a_bom_is_accepted(tmp_path):
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('[{"prompt": "caf\u00e9", "completion": "ok"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.json: not UTF-8 text \(.*can't decode byte 0xe9"):
        load_examples(latin1)
    with pytest.raises(ValueError, match="latin1.json: not UTF-8 text"):
        load_instructions(latin1)
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.json").write_bytes(bom + json.dumps([{"prompt": "p", "completion": "c"}]).encode())
    (tmp_path / "bom.jsonl").write_bytes(bom + b'"first"\n"second"\n')
    assert [(e.prompt, e.response) for e in load_examples(tmp_path / "bom.json")] == [("p", "c")]
    assert load_instructions(tmp_path / "bom.jsonl") == ["first", "second"]
