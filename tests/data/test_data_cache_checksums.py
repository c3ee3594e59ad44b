"""A tokenized-data cache whose values were changed in place (structure, sizes and header intact)
is refused on open, naming the file and the array; the check is one read of the file."""
import json
import re
import struct

import numpy as np
import pytest

from fastprocon.data.cache import load_training_set
from fastprocon.models.specs import tiny_tokenizer

ROWS = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(20)]


@pytest.fixture
def built(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tok = tiny_tokenizer()
    return data, tok, load_training_set(data, tok, 80, cache_dir=tmp_path / "cache").path


def rewrite(path, name, change):
    """Apply ``change`` to the values of array ``name`` inside the file, keeping every byte count."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    entry = json.loads(raw[8:8 + n])[name]
    start, stop = (8 + n + o for o in entry["data_offsets"])
    dtype = {"I32": np.int32, "I64": np.int64, "U8": np.uint8}[entry["dtype"]]
    values = np.frombuffer(bytes(raw[start:stop]), dtype).copy()
    change(values)
    raw[start:stop] = values.tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name, change", [
    ("tokens", lambda v: v.__setitem__(slice(5, 8), v[5:8] + 1)),            # other token values
    ("prompt_lengths", lambda v: v.__setitem__(0, v[0] - 1)),               # one more token trained on
    ("id_bytes", lambda v: v.__setitem__(-1, ord("0") if v[-1] != ord("0") else ord("1"))),
])
def test_values_changed_in_place_are_refused_naming_the_array(built, name, change):
    data, tok, path = built
    rewrite(path, name, change)
    with pytest.raises(ValueError, match=re.escape(str(path)) + rf": corrupt data cache \({name} fails its sha256 "
                                         r"checksum\); delete it and it is rebuilt"):
        load_training_set(data, tok, 80, cache_dir=path.parent)
    path.unlink()
    assert len(load_training_set(data, tok, 80, cache_dir=path.parent)) == len(ROWS)
