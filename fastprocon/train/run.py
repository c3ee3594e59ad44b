"""``train(cfg)``: one whole run of the :class:`~fastprocon.train.trainer.Trainer` (single process
or under torchrun), with its run-directory lock, signal handling and summary."""
from __future__ import annotations

import fastprocon.distributed as D
from fastprocon.train.checkpoint import RunLock
from fastprocon.train.config import Config, validate
from fastprocon.train.metrics import read_metrics
from fastprocon.train.prepare import run_dir_of
from fastprocon.train.signals import StopRequest
from fastprocon.train.trainer import Trainer, TrainResult
from fastprocon.utils.io import write_json


def train(cfg: Config) -> TrainResult:
    """Run training for ``cfg`` (single process, or under torchrun). Writes the run directory:
    config.toml, metrics.jsonl, checkpoints/, model/ (the export), summary.json; holds its .lock
    for the whole run (a second run there fails at once)."""
    validate(cfg)   # before the process group: a bad Config edited after load_config fails up front
    ctx = D.init_distributed(cfg.model.device)
    trainer, lock, stop = None, RunLock(run_dir_of(cfg)), StopRequest(ctx.device)
    # SIGTERM/SIGINT: a checkpoint after the current step (see train/signals.py); outside the steps
    # they raise signals.Interrupted
    with stop.installed():
        try:
            lock.acquire()                 # rank 0 holds <run dir>/.lock until the run ends
            trainer = Trainer(cfg, ctx, stop)
            result = trainer.fit()
            if ctx.is_main:
                write_json(result.run_dir / "summary.json", summary_of(result, trainer))
        except BaseException:
            del trainer
            lock.release()
            D.shutdown(ctx, clean=False)   # no barrier: the other processes may be stuck elsewhere
            raise
        del trainer                        # the FSDP model goes before the group (see D.shutdown)
        lock.release()
        D.shutdown(ctx)
    return result


def summary_of(result: TrainResult, trainer: Trainer) -> dict:
    """The run's summary: CE and ProCon from the whole metrics.jsonl (also the steps of earlier,
    resumed invocations), so a resumed or re-exported run reports the run, not its last segment."""
    records = read_metrics(result.run_dir) if (result.run_dir / "metrics.jsonl").is_file() else []
    records = [r for r in records if "ce" in r]   # training lines (probe lines have probe_* keys only)
    first = records[0] if records else None
    last = records[-1] if records else None
    return {"run_dir": str(result.run_dir), "model": trainer.model_name, "processes": trainer.ctx.world_size,
            "device": trainer.ctx.device.type, "start_step": result.start_step, "final_step": result.final_step,
            "seconds": round(result.seconds, 2), "examples": len(trainer.data.examples),
            "schedule": trainer.alpha.describe(),
            "constrained_layers": trainer.procon.layers if trainer.procon else [],
            "first_ce": first["ce"] if first else None, "last_ce": last["ce"] if last else None,
            "last_procon": last["procon"] if last else None,
            "stopped": result.stopped, "probe_seconds": round(trainer.probe.seconds, 2) if trainer.probe else None,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "export_dir": str(result.export_dir) if result.export_dir else None,
            "stopped_by": result.stopped_by}
