"""ProCon inside a Hugging Face ``transformers.Trainer`` or ``trl.SFTTrainer`` run, one call:

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    add_procon(trainer, alpha=1.0, schedule="warmup", alpha_warmup_epochs=1)   # ProCon_wu
    trainer.train()

:func:`add_procon` builds a :class:`~fastprocon.integrations.procon.ProCon` on ``trainer.model``
(directions made or loaded, hooks installed, z0 recorded by a pre-pass over the trainer's own
training data loader, or adapters-off under PEFT), then wraps two methods of this trainer
instance: ``get_batch_samples`` (called once per optimizer step with the step's micro-batches:
alpha and the step's sample count, as ``fastprocon train``) and ``log`` (adds ``procon`` and
``procon_alpha`` beside ``loss``). Nothing else in the trainer changes: its CE ("loss"), its
optimizer, its schedule and its collator are used as they are.
"""
from __future__ import annotations

from fastprocon.integrations.procon import ProCon, refuse_sharded

_ADDED = "_fastprocon_procon"   # the ProCon add_procon gave this trainer


def steps_per_epoch(trainer) -> int:
    """Optimizer steps per epoch, as transformers' Trainer counts them (a last partial step counts)."""
    n, accum = len(trainer.get_train_dataloader()), trainer.args.gradient_accumulation_steps
    return max(n // accum + int(n % accum > 0), 1)


def add_procon(trainer, **settings) -> ProCon:
    """Add ProCon to ``trainer`` (a ``transformers.Trainer``, including TRL's ``SFTTrainer``) before
    ``trainer.train()``. ``settings`` are :class:`ProCon`'s (the ``[procon]`` keys of ``fastprocon
    train``, plus ``reference_cache``). Returns the ProCon object (``.remove()`` takes it off)."""
    if getattr(trainer, _ADDED, None) is not None:
        raise ValueError("add_procon: this trainer already has ProCon (an earlier add_procon call); a second would "
                         "install a second set of hooks and double the penalty's gradient: call add_procon once")
    args = trainer.args
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError("add_procon: this Trainer uses FSDP or DeepSpeed, which fastprocon.integrations does not "
                         "support; use `fastprocon train` (FSDP2 under torchrun) for sharded runs")
    if args.world_size > 1:
        raise ValueError(f"add_procon: this Trainer runs on {args.world_size} processes; fastprocon.integrations "
                         "supports one (use `fastprocon train` under torchrun)")
    if args.fp16:
        raise ValueError("add_procon: fp16 training scales the loss (GradScaler), which the injected ProCon "
                         "gradient would miss; use bf16=True or fp32")
    refuse_sharded(trainer.model)
    tokenizer = getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)   # a multimodal processor holds its tokenizer
    if tokenizer is None:
        raise ValueError("add_procon: the trainer has no processing_class (tokenizer); create it with "
                         "processing_class=tokenizer")
    procon = ProCon(trainer.model, tokenizer, steps_per_epoch=steps_per_epoch(trainer), **settings)
    if procon.needs_reference:
        procon.record_reference(trainer.get_train_dataloader())

    get_batch_samples, log = trainer.get_batch_samples, trainer.log

    def get_batch_samples_with_procon(epoch_iterator, num_batches, device):
        batches, num_items = get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            procon.begin_step(trainer.state.global_step, batches)
        return batches, num_items

    def log_with_procon(logs: dict, *args, **kwargs):
        if "loss" in logs:
            logs.update({k: v for k, v in procon.log_values().items() if v is not None})
        return log(logs, *args, **kwargs)

    trainer.get_batch_samples = get_batch_samples_with_procon
    trainer.log = log_with_procon
    setattr(trainer, _ADDED, procon)
    return procon
