"""Training configuration: typed sections, a TOML file plus ``key=value`` overrides, value checks.

A config file is TOML with the sections below; every key is optional (missing keys keep the
defaults here). Overrides name a key as ``section.key=value`` or, since every key name is
unique across sections, just ``key=value``; the value is parsed as a TOML value (``0.1``,
``true``, ``[1, 2]``, ``"text"``), and a bare word is taken as a string. Unknown sections or
keys and values of the wrong type are errors naming the file or override. Built-in configs
(``fastprocon/configs/<name>.toml``) are selected by name, e.g. ``--config tiny``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from fastprocon.procon.config import PROCON_CHOICES, ProConConfig, validate_procon

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class ModelConfig:
    spec: str = "smollm2"                  # load_model spec: "smollm2", "tiny", a HF dir, a hub id, a .gguf
    device: str = "auto"                   # "auto" (cuda when available), "cpu", "cuda"
    mixed_precision: str = "auto"          # "auto" (bf16 on cuda, fp32 on cpu), "bf16", "fp32"
    activation_checkpointing: bool = False
    compile: str = "auto"                  # torch.compile each decoder layer: "auto" (on CUDA), "on", "off";
                                           # checked against the eager layers at start-up (train/exactness.py)
    chunked_ce: bool = True                # CE through the output layer in row chunks, never the full logits
                                           # (where that equals the model's own CE; else the full logits)
    attn_implementation: str = "auto"      # "auto": flash-attn on CUDA, else sdpa, else eager (what the model
                                           # supports); or "sdpa", "eager", "flash_attention_2", "flex_attention"
    lora: bool = False                     # LoRA on the attention projections instead of full fine-tuning
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0


@dataclass
class DataConfig:
    train: str = "benign"                  # a data file (json/jsonl) or a built-in set name
    safety: str = "safety"                 # the `_safe` mix-in set (used when safety_samples > 0)
    safety_samples: int = 0                # K safety samples mixed into the training data
    max_length: int = 256                  # tokens; longer examples are cut on the right
    skip_bad_rows: bool = False
    drop_overlong_prompts: bool = False    # drop examples whose prompt alone fills max_length (else an error)
    packing: str = "auto"                  # whole samples packed into rows: "auto" (where exact), "on", "off"


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    lr_warmup_steps: int = 0               # linear warm-up from 0, then cosine decay
    min_lr_ratio: float = 0.1              # final lr = lr * min_lr_ratio
    grad_clip: float = 1.0                 # max global grad norm; 0 = no clipping (norm still logged)


@dataclass
class TrainConfig:
    name: str = "procon"
    run_dir: str = ""                      # "" = runs/<name>
    seed: int = 0
    max_steps: int = 0                     # optimizer steps; 0 = from epochs
    epochs: float = 1.0
    batch_size: int = 8                    # samples per optimizer step, over all processes
    micro_batch_size: int = 4              # samples per forward pass on one process (padded batches)
    tokens_per_micro_batch: int = 0        # tokens per packed row (forward pass); 0 = max_length (flash-attn:
                                           # micro_batch_size x max_length)
    log_every: int = 10                    # steps between metric lines (and host syncs)
    tensorboard: bool = False
    prefetch: int = 2                      # steps' batches prepared ahead by a background thread; 0 = none
    # live safety probe (train/probe.py) at step 0, every K steps, the last; 0 = off
    safety_probe_every: int = 0
    probe_harmful: str = "harmful_eval"    # probe prompts: a file or built-in set name
    probe_harmless: str = "harmless_eval"
    probe_max_prompts: int = 0             # seeded subset per prompt set; 0 = all
    probe_samples: int = 8                 # first N training examples: the projection-deviation slice
    probe_batch_size: int = 16
    min_refusal_share: float = 0.0         # warn when the probe's harmful refusal share falls below; 0 = off
    stop_below_min_refusal: bool = False   # ... and stop there (with a checkpoint)


@dataclass
class CheckpointConfig:
    checkpoint_every: int = 0              # steps; 0 = only at the end
    keep_checkpoints: int = 2              # newest complete checkpoints kept
    resume: str = "auto"                   # "auto" (latest in the run dir), "never", or a checkpoint dir
    export: bool = True                    # write the final model in Hugging Face format (LoRA: merged)
    export_adapter: bool = False           # LoRA runs: also the adapter alone, in PEFT's format (model/adapter/)
    resume_changes: str | list[str] = ""   # settings that may change meaning on resume: "all" or keys ("alpha,lr")


@dataclass
class ParallelConfig:
    replicate: int = 1                     # HSDP: replicas of the model (e.g. nodes); 1 = plain FSDP
    shard: int = 0                         # processes sharing one replica's shards; 0 = processes / replicate


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    procon: ProConConfig = field(default_factory=ProConConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = [f.name for f in dataclasses.fields(Config)]
CHOICES = {
    "model.device": ("auto", "cpu", "cuda"),
    "model.mixed_precision": ("auto", "bf16", "fp32"),
    "model.compile": ("auto", "on", "off"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"),
    "data.packing": ("auto", "on", "off"),
    **{f"procon.{key}": allowed for key, allowed in PROCON_CHOICES.items()},
}


def _field_types(section: str) -> dict[str, object]:
    cls = type(getattr(Config(), section))
    return typing.get_type_hints(cls)


def _key_index() -> dict[str, str]:
    """bare key -> section (every key name is unique across sections)."""
    index = {}
    for section in SECTIONS:
        for key in _field_types(section):
            assert key not in index, f"config key {key!r} is in two sections"
            index[key] = section
    return index


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return tp.__name__


def _coerce(value, tp):
    """``value`` as type ``tp``, or raise TypeError. An int is accepted for a float."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option)
            except TypeError:
                continue
        raise TypeError
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise TypeError
    if not isinstance(value, tp):
        raise TypeError
    return value


def _set(cfg: Config, section: str, key: str, value, where: str) -> None:
    types_ = _field_types(section)
    if key not in types_:
        raise ValueError(f"{where}: unknown key {key!r} in section [{section}]; valid keys: {', '.join(types_)}")
    if isinstance(value, bool) and {"on", "off"} <= set(CHOICES.get(f"{section}.{key}", ())):
        value = "on" if value else "off"      # an on/off switch also takes true/false
    try:
        value = _coerce(value, types_[key])
    except TypeError:
        raise TypeError(f"{where}: {section}.{key} must be {_type_name(types_[key])}, "
                        f"got {type(value).__name__} {value!r}") from None
    setattr(getattr(cfg, section), key, value)


def _parse_value(text: str):
    """A TOML value, or the text itself when it does not parse (a bare word means a string)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve_config_path(name_or_path: str) -> Path:
    """A config file path, or the name of a built-in config (``fastprocon/configs/<name>.toml``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtin = CONFIG_DIR / f"{name_or_path}.toml"
    if "/" not in name_or_path and builtin.is_file():
        return builtin
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    raise FileNotFoundError(f"config file not found: {path} (built-in configs: {', '.join(names)})")


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Config from the dataclass defaults, then the TOML file ``path`` (a path or a built-in
    config name; None = no file), then ``overrides`` (``key=value`` or ``section.key=value``).

    Raises FileNotFoundError (no such file), ValueError (TOML syntax, unknown section or key,
    a bad override or value) or TypeError (a value of the wrong type).
    """
    if isinstance(overrides, str):   # a lone "alpha=0.5" would otherwise be read character by character
        raise TypeError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    cfg = Config()
    index = _key_index()
    if path is not None:
        file = resolve_config_path(path)
        try:
            data = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{file}: invalid TOML: {err}") from None
        for section, table in data.items():
            if section not in SECTIONS and not isinstance(table, dict) and section in index:
                raise ValueError(f"{file}: {section} = {table!r} is outside any section; put it under "
                                 f"[{index[section]}]")
            if section not in SECTIONS:
                raise ValueError(f"{file}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)}")
            if not isinstance(table, dict):
                raise ValueError(f"{file}: [{section}] must be a table of keys, got {table!r}")
            for key, value in table.items():
                _set(cfg, section, key, value, str(file))
    for item in overrides:
        where = f"override {item!r}"
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{where}: expected key=value (e.g. alpha=0.2 or procon.alpha=0.2)")
        section, dot, name = key.rpartition(".")
        if not dot:
            if key not in index:
                raise ValueError(f"{where}: unknown config key {key!r}; valid keys: {', '.join(sorted(index))}")
            section, name = index[key], key
        elif section not in SECTIONS:
            raise ValueError(f"{where}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        _set(cfg, section, name, _parse_value(text.strip()), where)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check values that do not depend on the model, the data or the process count."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ValueError(f"config {dotted} = {value!r}: expected one of {', '.join(map(repr, allowed))}")

    def need(ok: bool, dotted: str, what: str) -> None:
        if not ok:
            section, key = dotted.split(".")
            raise ValueError(f"config {dotted} = {getattr(getattr(cfg, section), key)!r}: must be {what}")

    def finite(x: float) -> bool:
        return math.isfinite(x)

    m, d, p, o, t, c = cfg.model, cfg.data, cfg.procon, cfg.optim, cfg.train, cfg.checkpoint
    need(bool(m.spec), "model.spec", "a model spec")
    need(m.lora_rank >= 1, "model.lora_rank", ">= 1")
    need(finite(m.lora_alpha) and m.lora_alpha > 0, "model.lora_alpha", "> 0")
    need(0 <= m.lora_dropout < 1, "model.lora_dropout", "in [0, 1)")
    need(bool(d.train), "data.train", "a data file or built-in set name")
    need(d.safety_samples >= 0, "data.safety_samples", ">= 0")
    need(d.safety_samples == 0 or bool(d.safety), "data.safety", "a data file when safety_samples > 0")
    need(d.max_length >= 2, "data.max_length", ">= 2")
    validate_procon(p, lora=m.lora)
    need(finite(o.lr) and o.lr > 0, "optim.lr", "> 0")
    need(finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", ">= 0")
    need(0 <= o.beta1 < 1, "optim.beta1", "in [0, 1)")
    need(0 <= o.beta2 < 1, "optim.beta2", "in [0, 1)")
    need(finite(o.eps) and o.eps > 0, "optim.eps", "> 0")
    need(o.lr_warmup_steps >= 0, "optim.lr_warmup_steps", ">= 0")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]")
    need(finite(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", ">= 0 (0 = no clipping)")
    need(bool(t.name) and "/" not in t.name and t.name not in (".", ".."), "train.name",
         "a non-empty name without '/' (and not '.' or '..')")
    need(t.max_steps >= 0, "train.max_steps", ">= 0")
    need(finite(t.epochs) and (t.epochs > 0 or t.max_steps > 0), "train.epochs", "> 0 when max_steps = 0")
    need(t.batch_size >= 1, "train.batch_size", ">= 1")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", ">= 1")
    need(t.tokens_per_micro_batch >= 0, "train.tokens_per_micro_batch", ">= 0 (0 = the default row size)")
    need(t.batch_size % t.micro_batch_size == 0, "train.batch_size",
         f"a multiple of micro_batch_size ({t.micro_batch_size})")
    need(t.log_every >= 1, "train.log_every", ">= 1")
    need(t.prefetch >= 0, "train.prefetch", ">= 0")
    need(t.safety_probe_every >= 0, "train.safety_probe_every", ">= 0 (0 = off)")
    need(bool(t.probe_harmful) and bool(t.probe_harmless), "train.probe_harmful", "a prompt file or built-in set name")
    need(t.probe_max_prompts >= 0, "train.probe_max_prompts", ">= 0 (0 = all)")
    need(t.probe_samples >= 1, "train.probe_samples", ">= 1")
    need(t.probe_batch_size >= 1, "train.probe_batch_size", ">= 1")
    need(0 <= t.min_refusal_share <= 1, "train.min_refusal_share", "in [0, 1] (0 = off)")
    need(t.min_refusal_share == 0 or t.safety_probe_every > 0, "train.min_refusal_share",
         "0 unless safety_probe_every > 0 (the guard reads the probe)")
    need(not t.stop_below_min_refusal or (t.min_refusal_share > 0 and t.safety_probe_every > 0),
         "train.stop_below_min_refusal", "false unless min_refusal_share > 0 and safety_probe_every > 0")
    need(c.checkpoint_every >= 0, "checkpoint.checkpoint_every", ">= 0 (0 = only at the end)")
    need(c.keep_checkpoints >= 1, "checkpoint.keep_checkpoints", ">= 1")
    need(not c.export_adapter or (c.export and m.lora), "checkpoint.export_adapter",
         "false unless checkpoint.export and model.lora are true (the adapter of a LoRA run's export)")
    need(cfg.parallel.replicate >= 1, "parallel.replicate", ">= 1 (1 = plain FSDP)")
    need(cfg.parallel.shard >= 0, "parallel.shard", ">= 0 (0 = the processes per replica left)")
    need(bool(c.resume), "checkpoint.resume", "'auto', 'never' or a checkpoint directory")
    names = c.resume_changes.split(",") if isinstance(c.resume_changes, str) else c.resume_changes
    unknown = [n.strip() for n in names if n.strip() and n.strip() != "all" and n.strip() not in _key_index()
               and n.strip() not in {f"{s}.{k}" for s in SECTIONS for k in _field_types(s)}]
    need(not unknown, "checkpoint.resume_changes", f"'all' or config keys (unknown: {', '.join(unknown)})")


def to_toml(cfg: Config) -> str:
    """The config as TOML text that :func:`load_config` reads back to an equal config."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    lines = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value(v)}" for key, v in table.items())
        lines.append("")
    return "\n".join(lines)
