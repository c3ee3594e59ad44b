"""Do two training runs compute the same thing? Compares their metrics.jsonl row by row, exactly.

    python experiments/same_run.py RUN_DIR_A RUN_DIR_B

Every logged value (losses, gradient norm, learning rate, alpha, the live probe's per-layer drift)
must be equal to the last bit; timings and memory (tokens_per_s, mfu, peak_rss_gib, probe_seconds)
are left out. Exit 0 when equal, 1 with the first difference otherwise. Used to show that a later
code version reproduces a cell of the powered reproduction (experiments/results/POWERED.md).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MACHINE_DEPENDENT = {"tokens_per_s", "mfu", "peak_rss_gib", "probe_seconds"}


def rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_difference(a: list[dict], b: list[dict]) -> str | None:
    if len(a) != len(b):
        return f"{len(a)} rows against {len(b)}"
    for ra, rb in zip(a, b):
        for key in sorted((set(ra) | set(rb)) - MACHINE_DEPENDENT):
            if ra.get(key, "<absent>") != rb.get(key, "<absent>"):
                return f"step {ra.get('step')}: {key} = {ra.get(key, '<absent>')!r} against {rb.get(key, '<absent>')!r}"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    a, b = rows(Path(argv[0])), rows(Path(argv[1]))
    compared = sum(len(set(r) - MACHINE_DEPENDENT) for r in a)
    difference = first_difference(a, b)
    print(f"{len(a)} rows, {compared} values compared: " + ("all equal" if difference is None else difference))
    return 0 if difference is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
