"""Elastic restart: a 2-process run under torchrun's elastic agent (c10d rendezvous, --nnodes=1:1,
--max-restarts=1) loses a process (SIGKILL during step 6, after the checkpoint at step 4); the agent
stops the other one, starts both again, and the run resumes by itself from that checkpoint and ends
equal to an uninterrupted 2-process run (norm = l2sq, a smooth penalty); the warning about torchrun's
shared rendezvous store, and the line a restarted process says.

Run as a script (under torchrun) this file is the training worker: rank 1 kills itself during step
6 of the first attempt (TORCHELASTIC_RESTART_COUNT = 0).
"""
import os
import signal
import sys

import pytest
from test_train_distributed import free_port, torchrun

COMPARED = ("step", "ce", "procon", "alpha", "lr", "grad_norm")
OVERRIDES = ["norm=l2sq", "max_steps=8", "log_every=1", "checkpoint_every=4", "export=false"]


def worker(run_dir: str, kill: str) -> int:
    from fastprocon.cli import main
    from fastprocon.train import Trainer

    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if kill == "kill" and first_attempt and os.environ.get("RANK") == "1":
        original = Trainer.step

        def killed_at_step_6(self, step):
            if step == 5:
                os.kill(os.getpid(), signal.SIGKILL)   # a lost process (or node): no clean-up at all
            return original(self, step)

        Trainer.step = killed_at_step_6
    return main(["train", "--config", "tiny", f"run_dir={run_dir}", *OVERRIDES])


def elastic(*args, share_store=False):
    """torchrun with the elastic agent as on several nodes (c10d rendezvous), one restart allowed;
    the workers use a store of their own unless ``share_store`` (see docs/scale.md)."""
    return torchrun("--nnodes=1:1", "--max-restarts=1", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=localhost:{free_port()}", "--rdzv-id=elastic-test", *args,
                    env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0" if share_store else "1"}, check=not share_store)


def test_a_killed_process_is_restarted_and_the_run_ends_as_an_uninterrupted_one(tmp_path):
    """The uninterrupted run is launched the same way but with torchrun's default shared store, so it
    also shows the warning the trainer gives about that store (a restart there would fail to connect)."""
    from fastprocon.train.metrics import read_metrics

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    rc, out, err = elastic(__file__, whole, "whole", share_store=True)
    assert rc == 0, err[-3000:]
    assert "warning: torchrun may restart the processes but shares its rendezvous store" in out
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in out
    out = elastic(__file__, killed, "kill")
    assert "restarted by torchrun (restart 1)" in out and "step_000004 at step 4" in out, out[-3000:]
    assert "warning: torchrun may restart" not in out
    got, want = read_metrics(killed), read_metrics(whole)
    assert [r["step"] for r in got] == list(range(1, 9))
    for g, w in zip(got, want):
        assert g["step"] == w["step"] and g["lr"] == w["lr"] and g["alpha"] == w["alpha"]
        for key in ("ce", "procon", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=0), (key, g["step"])
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_000008"


@pytest.mark.parametrize("env, said", [
    ({}, None),
    ({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RESTART_COUNT": "0"},
     None),
    ({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "2"}, "warning: torchrun may restart"),
    ({"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_RESTART_COUNT": "1"},
     "restarted by torchrun (restart 1)"),
])
def test_elastic_note(monkeypatch, env, said):
    from fastprocon.distributed import elastic_note

    for key in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    note = elastic_note()
    assert note == said if said is None else note.startswith(said)


if __name__ == "__main__":
    sys.exit(worker(*sys.argv[1:]))
