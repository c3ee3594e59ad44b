"""Resuming a run: which checkpoint to resume from, what it must match, what it restores.

:class:`ResumingTrainer` holds the :class:`~fastprocon.train.trainer.Trainer`'s resume steps (a base
class of it, using its attributes): the model and data identity a checkpoint must match, the
directions and z0 cache it must have trained with, the trainer state written into every
checkpoint, and the restore itself (model, optimizer, LR schedule followed from the config,
metrics lines after the checkpoint dropped, changed settings reported and recorded).
"""
from __future__ import annotations

from pathlib import Path

import fastprocon.distributed as D
from fastprocon.refusal.directions import directions_hash
from fastprocon.train.export import clean_export_staging
from fastprocon.train.resume_changes import HARMLESS, config_changes, recorded_config
from fastprocon.train.schedule import WarmupCosine, follow_config
from fastprocon.utils.checksums import file_sha256, tree_sha256


class ResumingTrainer:
    """The resume steps of the Trainer (see the module docstring); not used on its own."""

    def _identity(self) -> tuple[dict, dict]:
        """(model, data) identity a checkpoint must match to be resumed (see checkpoint.check_resumable)."""
        t = self.cfg.train
        return ({"model": self.model_name, "model_fingerprint": self.model_fingerprint, "lora": self.cfg.model.lora},
                {"dataset_hash": self.data.hash, "batch_size": t.batch_size, "seed": t.seed})

    def _procon_inputs(self) -> dict | None:
        """The directions and reference cache this run trains with (paths and hashes), recorded in
        every checkpoint and compared on resume (see checkpoint.check_same_inputs)."""
        if self.procon is None:
            return None
        p = self.procon
        return {"directions": str(p.directions_path), "directions_hash": directions_hash(p.directions),
                "reference": str(p.reference_path) if p.reference_path else None,
                "reference_sha256": tree_sha256(p.reference_path) if p.reference_path else None,
                # every file of the cache (index and shards), by name: a rewritten shard is named on resume
                "reference_files": {f.name: file_sha256(f) for f in p.reference.files.file_paths()}
                if p.reference is not None else None}

    def _trainer_state(self, step: int) -> dict:
        model, data = self._identity()
        return {"scheduler": self.scheduler.state_dict(), "data": {**self.batches.position(step), **data},
                "procon_inputs": self._inputs, "config": self.cfg.to_dict(), **model}

    def _plan_resume(self) -> tuple[Path, dict] | None:
        """The checkpoint to resume from and its trainer state, checked against this config on
        rank 0 (every rank gets rank 0's answer, or its error); None = a fresh start."""
        removed = self.ckpt.clean_partial()
        if removed:
            self.say(f"removed incomplete checkpoint(s) {', '.join(removed)} left by an interrupted save")
        staging = D.on_main(lambda: clean_export_staging(self.run_dir / "model"))
        if staging:
            self.say(f"removed {', '.join(staging)}: staging left by an interrupted export")
        plan = D.on_main(lambda: self.ckpt.plan_resume(self.cfg.checkpoint.resume, *self._identity(),
                                                       config=self.cfg.to_dict()))
        if plan is None:
            return None
        path, state, note = plan
        if note:
            self.say(f"warning: {note}")
        return path, state

    def _resume(self) -> int:
        self._config_changes = {}
        if self._resume_from is None:
            D.on_main(lambda: self.metrics.truncate_after(-1))   # a fresh start: no line survives (probe step 0 too)
            return 0
        path, state = self._resume_from
        self.ckpt.load(path, state, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        o = self.cfg.optim
        changes = follow_config(self.scheduler, o.lr, WarmupCosine(o.lr_warmup_steps, self.max_steps, o.min_lr_ratio))
        if changes:
            self.say(f"LR schedule changed since {path.name} ({', '.join(changes)}): following the config from "
                     f"step {state['step']} (lr now {self.scheduler.get_last_lr()[0]:g})")
        note = D.on_main(lambda: self.metrics.truncate_after(state["step"]))
        if note:
            self.say(f"warning: {note}")
        recorded = recorded_config(path, state)
        self._config_changes = config_changes(recorded, self.cfg.to_dict()) if recorded is not None else {}
        if self._config_changes:   # each allowed (checked by plan_resume); fit keeps the new config version
            self.say(f"config changed since {path.name}: " + ", ".join(
                f"{key} {old!r} -> {new!r}" for key, (old, new) in self._config_changes.items()))
        if any(key not in HARMLESS for key in self._config_changes):   # a change of meaning, allowed: on record
            self.metrics.write({"step": state["step"], "config_changes": self._config_changes})
        self.say(f"resumed from {path} at step {state['step']} (saved by {state['world_size']} process(es))")
        return state["step"]
