"""The fastprocon trainer: FSDP2 instruction fine-tuning with ProCon at the decoder-layer inputs.

    from fastprocon.train import load_config, train
    result = train(load_config("tiny", ["max_steps=20", "alpha=0.2"]))

``fastprocon train --config FILE key=value ...`` is the command-line form (single process or
under torchrun). Modules: config (TOML + overrides), batches (data order), loss (global
normalisation), schedule (LR and alpha), distributed (process group, FSDP2), checkpoint (DCP),
metrics (JSONL), prepare (model, data, directions, z0), export (HF format), trainer (the loop),
resume (what a resume checks and restores), run (``train``).
"""
from fastprocon.train.config import Config, load_config
from fastprocon.train.run import train
from fastprocon.train.trainer import NonFiniteError, Trainer, TrainResult

__all__ = ["Config", "load_config", "train", "Trainer", "TrainResult", "NonFiniteError"]
