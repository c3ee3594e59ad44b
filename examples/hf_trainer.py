"""ProCon_wu in a Hugging Face `transformers.Trainer` run: one added call, `add_procon(trainer, ...)`.

    ./run.sh python examples/hf_trainer.py              # the random-init `tiny` model, seconds on a CPU
    ./run.sh python examples/hf_trainer.py --smollm2    # SmolLM2-135M-Instruct (built in)
"""
import argparse
import tempfile

from transformers import Trainer, TrainingArguments

from fastprocon.data.examples import load_examples, resolve_data_path
from fastprocon.data.tokenize import collate, tokenize_examples
from fastprocon.integrations import add_procon
from fastprocon.models.load import load_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny test model")
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--out", default="", help="output directory (default: a temporary one)")
args = parser.parse_args()

loaded = load_model("smollm2" if args.smollm2 else "tiny")
model, tokenizer = loaded.model, loaded.tokenizer
train_set, _ = tokenize_examples(load_examples(resolve_data_path("benign")), tokenizer, max_length=128)


def collate_fn(rows):
    batch = collate(rows, tokenizer.pad_token_id)
    del batch["ids"]
    return batch


training_args = TrainingArguments(
    output_dir=args.out or tempfile.mkdtemp(prefix="hf-trainer-"), max_steps=args.steps,
    per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3 if not args.smollm2 else 2e-5,
    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
    remove_unused_columns=False)
trainer = Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=collate_fn,
                  processing_class=tokenizer)
# ProCon_wu: alpha = 1 for the first 2 optimizer steps, then plain fine-tuning (alpha = 0)
add_procon(trainer, schedule="warmup", alpha=1.0, alpha_warmup_steps=2)
trainer.train()
for record in trainer.state.log_history:
    if "loss" in record:
        print({k: record.get(k) for k in ("step", "loss", "procon", "procon_alpha")})
