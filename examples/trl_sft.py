"""ProCon_wu_safe in a TRL `SFTTrainer` run. Against a plain SFTTrainer script it adds three lines:
the import, the `_safe` mix of refusal examples into the dataset, and `add_procon(trainer, ...)`.

    ./run.sh python examples/trl_sft.py              # the random-init `tiny` model, seconds on a CPU
    ./run.sh python examples/trl_sft.py --smollm2    # SmolLM2-135M-Instruct (built in)
    ./run.sh python examples/trl_sft.py --packing    # packed (padding-free) batches
"""
import argparse
import tempfile

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from fastprocon.data.examples import load_examples, resolve_data_path
from fastprocon.integrations import add_procon, with_safety_samples
from fastprocon.models.load import load_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny test model")
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--packing", action="store_true", help="pack samples into rows (padding-free batches)")
parser.add_argument("--no-procon", action="store_true", help="plain SFTTrainer (for overhead comparisons)")
parser.add_argument("--out", default="", help="output directory (default: a temporary one)")
args = parser.parse_args()

loaded = load_model("smollm2" if args.smollm2 else "tiny")
model, tokenizer = loaded.model, loaded.tokenizer
# a conversational prompt-completion dataset, as TRL takes it
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": ex.prompt}],
                              "completion": [{"role": "assistant", "content": ex.response}]}
                             for ex in load_examples(resolve_data_path("benign"))])
if not args.no_procon:
    dataset = with_safety_samples(dataset, 16, seed=0)        # ProCon: the _safe mix (built-in refusal examples)

config = SFTConfig(
    output_dir=args.out or tempfile.mkdtemp(prefix="trl-sft-"), max_steps=args.steps, per_device_train_batch_size=4,
    gradient_accumulation_steps=2, learning_rate=3e-3 if not args.smollm2 else 2e-5, lr_scheduler_type="constant",
    max_length=128, packing=args.packing, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
if not args.no_procon:
    # ProCon_wu: alpha = 1 for the first epoch, then plain SFT
    add_procon(trainer, schedule="warmup", alpha=1.0, alpha_warmup_epochs=1)
trainer.train()
for record in trainer.state.log_history:
    if "loss" in record:
        print({k: record.get(k) for k in ("step", "loss", "procon", "procon_alpha")})
