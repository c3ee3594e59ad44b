"""The prefetch thread: it prepares exactly what the training thread would (the trainer's steps,
tensor for tensor), an error there is the same error on the training thread (and the same one line
from the CLI), and it stops when the block ends, also while blocked on a full queue."""
import threading
import time

import pytest
import torch

import fastprocon.distributed as D
from fastprocon.cli import main
from fastprocon.procon.reference import ReferenceCache
from fastprocon.train import Trainer, load_config
from fastprocon.train.metrics import read_metrics
from fastprocon.train.prefetch import Prefetcher


def test_items_come_in_order_and_equal_the_direct_calls():
    calls = []

    def prepare(i):
        calls.append((i, threading.current_thread().name))
        return {"i": i, "x": torch.arange(i)}

    with Prefetcher(prepare, range(3, 9), depth=2) as pf:
        got = [pf.get(i) for i in range(3, 9)]
        with pytest.raises(RuntimeError, match="asked for 9, the next is none"):
            pf.get(9)
    assert [g["i"] for g in got] == list(range(3, 9))
    assert all(torch.equal(g["x"], torch.arange(g["i"])) for g in got)
    assert [i for i, _ in calls] == list(range(3, 9))
    assert {name for _, name in calls} == {"fastprocon-prefetch"}    # none on this thread


def test_out_of_order_get_is_refused():
    with Prefetcher(lambda i: i, [0, 1], depth=1) as pf:
        with pytest.raises(RuntimeError, match="asked for 1, the next is 0"):
            pf.get(1)


def test_a_worker_error_is_raised_here_unchanged_at_its_item():
    error = ValueError("sample id 'x' has 3 response tokens in the batch but 4 in the reference cache")

    def prepare(i):
        if i == 2:
            raise error
        return i

    with Prefetcher(prepare, range(5), depth=2) as pf:
        assert [pf.get(0), pf.get(1)] == [0, 1]
        with pytest.raises(ValueError) as info:
            pf.get(2)
    assert info.value is error and str(info.value) == str(error)


def test_close_stops_a_worker_blocked_on_a_full_queue():
    prepared = []
    with Prefetcher(lambda i: prepared.append(i) or i, range(1000), depth=1) as pf:
        assert pf.get(0) == 0
        time.sleep(0.3)   # the worker fills the queue and waits
    assert not pf._thread.is_alive()
    assert len(prepared) <= 4          # it stopped instead of preparing everything
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher(lambda i: i, [0], depth=0)


def trainer_config(run_dir, *extra):
    return load_config("tiny", [f"run_dir={run_dir}", "max_steps=6", "export=false", "resume=never",
                                "packing=on", "tokens_per_micro_batch=200", *extra])


def assert_same(a, b, where=""):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("extra", [[], ["packing=off"]], ids=["packed", "padded"])
def test_the_prefetched_steps_equal_the_synchronous_ones(tmp_path, extra):
    ctx = D.init_distributed("cpu")
    try:
        trainer = Trainer(trainer_config(tmp_path, *extra), ctx)
        steps = range(trainer.max_steps)
        direct = [trainer.prepare_step(s) for s in steps]
        with Prefetcher(trainer.prepare_step, steps, depth=2) as pf:
            fetched = [pf.get(s) for s in steps]
        del trainer
    finally:
        D.shutdown(ctx)
    assert direct[0]["scale"] is not None and direct[0]["micro_batches"][0]["z0"] is not None
    assert_same(fetched, direct)


def test_a_data_error_on_the_worker_is_the_same_one_line_error(tmp_path, monkeypatch, capsys):
    original, calls = ReferenceCache.gather, []

    def failing_gather(self, ids, labels):
        calls.append(threading.current_thread().name)
        if len(calls) == 5:   # a micro-batch of step 3 (2 per step)
            raise ValueError(f"sample id {ids[0]!r} has 1 response tokens in the batch but 2 in the reference cache")
        return original(self, ids, labels)

    monkeypatch.setattr(ReferenceCache, "gather", failing_gather)
    lines = {}
    for prefetch in (0, 2):
        calls.clear()
        run_dir = tmp_path / str(prefetch)
        argv = ["train", "--config", "tiny", f"run_dir={run_dir}", "max_steps=6", "log_every=1", "export=false",
                "packing=off", f"prefetch={prefetch}"]
        assert main(argv) == 2
        lines[prefetch] = capsys.readouterr().err.strip().splitlines()[-1]
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]     # steps 1 and 2 ran, step 3 failed
        assert set(calls) == ({"fastprocon-prefetch"} if prefetch else {"MainThread"})
    assert lines[0] == lines[2]
    assert lines[2].startswith("fastprocon train: error: sample id ") and \
        lines[2].endswith("has 1 response tokens in the batch but 2 in the reference cache")


def test_a_run_with_prefetch_equals_one_without_bit_for_bit(tmp_path):
    from fastprocon.train import train
    records = {}
    for prefetch in (0, 1):
        result = train(trainer_config(tmp_path / str(prefetch), "max_steps=4", "log_every=1", f"prefetch={prefetch}"))
        records[prefetch] = [{k: r[k] for k in ("step", "ce", "procon", "grad_norm")} for r in result.metrics]
    assert len(records[0]) == 4 and records[0][0]["procon"] > 0
    assert records[1] == records[0]
