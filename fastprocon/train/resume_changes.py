"""Which settings may change when a run resumes, and which may not.

Every config key is in one of three classes:

- harmless (:data:`HARMLESS`): the steps compute what they did (where the run's length changes,
  the LR schedule that follows from it is announced);
- fixed (:data:`FIXED`): the model and the batch plan; a checkpoint is never resumed under another;
- every other key changes what the run computes (alpha, norm, schedule, lr, ...): refused, naming
  the key and both values, unless ``checkpoint.resume_changes`` allows it ("all", or the keys).

A resumed run records what changed in ``metrics.jsonl`` (one ``config_changes`` line) and keeps
each config version (``config.toml`` is the first; ``config.step_NNNNNN.toml`` holds the one a
resume from step NNNNNN ran with).
"""
from __future__ import annotations

from pathlib import Path

import tomllib

HARMLESS = frozenset({
    "model.device", "model.activation_checkpointing", "model.compile", "model.chunked_ce",
    # the directions and the z0 cache are checked by sha256 on resume; these only make or find them
    "procon.backend", "procon.directions", "procon.harmful", "procon.harmless", "procon.direction_batch_size",
    "procon.reference_cache", "procon.reference_dtype",
    "train.name", "train.run_dir", "train.max_steps", "train.epochs", "train.micro_batch_size", "train.log_every",
    "train.tensorboard", "train.prefetch", "train.safety_probe_every", "train.probe_harmful", "train.probe_harmless",
    "train.probe_max_prompts", "train.probe_samples", "train.probe_batch_size", "train.min_refusal_share",
    "train.stop_below_min_refusal",
    "checkpoint.checkpoint_every", "checkpoint.keep_checkpoints", "checkpoint.resume", "checkpoint.export",
    "checkpoint.export_adapter",
    "checkpoint.resume_changes",
    # the same steps sharded another way (FSDP or HSDP): the checkpoints reshard on load
    "parallel.replicate", "parallel.shard",
})
FIXED = frozenset({
    "model.spec", "model.lora", "model.lora_rank", "train.seed", "train.batch_size",
    "data.train", "data.safety", "data.safety_samples", "data.max_length", "data.skip_bad_rows",
    "data.drop_overlong_prompts",
})
ALL = "all"


def allowed_keys(resume_changes: str | list[str]) -> list[str]:
    """checkpoint.resume_changes as a list of names: "" -> [], "alpha, norm" -> ["alpha", "norm"]."""
    items = resume_changes.split(",") if isinstance(resume_changes, str) else resume_changes
    return [item.strip() for item in items if item.strip()]


def recorded_config(checkpoint: Path, state: dict) -> dict | None:
    """The config a checkpoint was trained with: its trainer state's record, or (a checkpoint
    without one) the run directory's config.toml; None when neither is there."""
    if isinstance(state.get("config"), dict):
        return state["config"]
    file = Path(checkpoint).parent.parent / "config.toml"
    try:
        return tomllib.loads(file.read_text())
    except (OSError, ValueError):
        return None


def config_changes(before: dict, after: dict) -> dict[str, list]:
    """{"section.key": [old, new]} for the keys whose values differ (keys missing on either side,
    from another version of the software, are not compared)."""
    changes = {}
    for section, table in after.items():
        old_table = before.get(section)
        if not isinstance(old_table, dict):
            continue
        for key, value in table.items():
            if key in old_table and old_table[key] != value:
                changes[f"{section}.{key}"] = [old_table[key], value]
    return changes


def check_changes(checkpoint: Path, changes: dict[str, list], resume_changes: str | list[str]) -> None:
    """ValueError naming the first change that may not be resumed: a fixed key, or one that changes
    what the run computes and is not allowed by ``resume_changes``."""
    allowed = allowed_keys(resume_changes)
    for dotted, (old, new) in changes.items():
        if dotted in HARMLESS:
            continue
        said = f"cannot resume from {checkpoint}: it was trained with {dotted} = {old!r}, this config gives {new!r}"
        if dotted in FIXED:
            raise ValueError(f"{said} (another model or batch plan); use checkpoint.resume = 'never' and another "
                             "run_dir")
        if ALL not in allowed and dotted not in allowed and dotted.split(".")[1] not in allowed:
            raise ValueError(f"{said}, which changes what the run computes; to resume with it anyway set "
                             f"checkpoint.resume_changes = \"{dotted.split('.')[1]}\" (the change is recorded in "
                             "metrics.jsonl), or start a new run in another run_dir")


def version_file(run_dir: Path, step: int) -> Path:
    """Where the config of a run resumed at ``step`` with another config is kept."""
    return Path(run_dir) / f"config.step_{step:06d}.toml"


def latest_config_file(run_dir: Path) -> Path:
    """The newest config version of a run directory (config.toml when it was never changed)."""
    versions = sorted(Path(run_dir).glob("config.step_*.toml"))
    return versions[-1] if versions else Path(run_dir) / "config.toml"
