"""ProCon in the loops people already have: Hugging Face Trainer, TRL's SFTTrainer, a plain loop.

    from fastprocon.integrations import add_procon      # Trainer / SFTTrainer: one call
    add_procon(trainer, alpha=0.1)                     # before trainer.train()

    from fastprocon.integrations import ProCon          # a plain PyTorch loop
    procon = ProCon(model, tokenizer, alpha=0.1)
    procon.record_reference(loader)                    # z0 pre-pass (full fine-tuning)
    for step, batch in enumerate(loader):
        procon.begin_step(step, [batch])               # alpha and the step's normaliser
        model(**batch).loss.backward(); ...

Modules: procon (the ProCon object), samples (samples in padded or packed batches, z0 by
content), hf (add_procon for transformers/TRL trainers), data (the ``_safe`` mix and
fastprocon's tokenization as ``datasets``; needs the optional ``datasets`` package). Nothing
here imports trl or datasets until a helper that needs them is called.
"""
from fastprocon.integrations.data import tokenized_dataset, with_safety_samples
from fastprocon.integrations.hf import add_procon
from fastprocon.integrations.procon import ProCon

__all__ = ["ProCon", "add_procon", "with_safety_samples", "tokenized_dataset"]
