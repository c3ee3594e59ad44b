"""ProCon (ProCon_s) in a plain PyTorch training loop: the lines marked `# ProCon` are all it adds.

    ./run.sh python examples/custom_loop.py              # the random-init `tiny` model, seconds on a CPU
    ./run.sh python examples/custom_loop.py --smollm2    # SmolLM2-135M-Instruct (built in), a few minutes on a CPU
"""
import argparse

import torch

from fastprocon.data.examples import load_examples, resolve_data_path
from fastprocon.data.tokenize import collate, tokenize_examples
from fastprocon.integrations import ProCon
from fastprocon.models.load import load_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny test model")
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--alpha", type=float, default=0.1)
parser.add_argument("--directions", default="", help="a directions file (made there when absent; default: in memory)")
args = parser.parse_args()

torch.manual_seed(0)
loaded = load_model("smollm2" if args.smollm2 else "tiny")
model, tokenizer = loaded.model, loaded.tokenizer
examples, _ = tokenize_examples(load_examples(resolve_data_path("benign")), tokenizer, max_length=128)


def collate_fn(rows):
    batch = collate(rows, tokenizer.pad_token_id)
    del batch["ids"]                     # input_ids, attention_mask, labels (-100 on prompt and padding)
    return batch


loader = torch.utils.data.DataLoader(examples, batch_size=4, shuffle=True, collate_fn=collate_fn)
procon = ProCon(model, tokenizer, alpha=args.alpha, directions=args.directions)   # ProCon: directions + hooks
procon.record_reference(loader)                                                   # ProCon: z0 of the initial model
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3 if not args.smollm2 else 2e-5)

model.train()
step = 0
while step < args.steps:
    for batch in loader:
        procon.begin_step(step, [batch])                                          # ProCon: alpha, normaliser
        loss = model(**batch).loss       # the CE; ProCon's gradient joins it in backward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        print({"step": step, "loss": round(loss.item(), 6), **procon.log_values()})   # ProCon: penalty, alpha
        if step == args.steps:
            break
