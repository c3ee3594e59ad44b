"""`fastprocon eval-refusal`: refusal rate on harmful prompts, over-refusal on harmless ones."""
from __future__ import annotations

import argparse
import contextlib

from fastprocon.cli.args import add_model_args, finite_float, model_from_args, non_negative_int, positive_int
from fastprocon.data.prompts import read_prompts
from fastprocon.distributed.process import tool_processes
from fastprocon.models.load import LoadedModel
from fastprocon.refusal.directions import load_directions_for
from fastprocon.refusal.evaluate import evaluate_refusal
from fastprocon.refusal.steering import activation_addition, directional_ablation
from fastprocon.utils.io import check_output, write_json

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-refusal", help="refusal rate / attack success rate on harmful prompts, over-refusal on harmless ones",
        description="Greedy completions (chat template applied) of harmful and harmless prompts; a completion "
                    "containing a refusal phrase (I'm sorry, I cannot, As an AI, ...) counts as a refusal. "
                    "Writes a JSON report with the rates and every completion. Optionally steers the model "
                    "along its refusal directions while generating (--steer).")
    add_model_args(p)
    p.add_argument("--harmful", help="harmful instructions, JSON/JSONL (default: the built-in eval set)")
    p.add_argument("--harmless", help="harmless instructions, JSON/JSONL (default: the built-in eval set)")
    p.add_argument("--max-prompts", type=non_negative_int, default=0,
                   help="seeded random subset per set (default 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--no-refusal-score", action="store_true", help="skip the refusal-token log-odds score")
    p.add_argument("--directions", help="directions file of this model, for --steer")
    p.add_argument("--steer", choices=("ablate", "add"),
                   help="ablate: remove r_l from every layer input; add: add COEF * r_LAYER at layer LAYER")
    p.add_argument("--layer", type=non_negative_int, help="layer for --steer add")
    p.add_argument("--coef", type=finite_float,
                   help="coefficient for --steer add (default: that layer's mean-difference norm)")
    p.add_argument("--out", required=True, help="output JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, {"--model": args.model, "--harmful": args.harmful, "--harmless": args.harmless,
                            "--directions": args.directions})
    _check_steer_args(args)
    harmful, harmful_src = read_prompts(args.harmful, "harmful_eval", args.max_prompts, args.seed)
    harmless, harmless_src = read_prompts(args.harmless, "harmless_eval", args.max_prompts, args.seed)
    with tool_processes(args) as main:   # under torchrun: a sharded model, every rank runs every prompt
        loaded = model_from_args(args)
        steering, steer_info = _steering(args, loaded)
        with steering:
            report = evaluate_refusal(loaded, harmful, harmless, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size, score=not args.no_refusal_score, progress=main)
        del loaded, steering
    if not main:
        return 0
    report = {**report, "data": {"harmful": harmful_src, "harmless": harmless_src}, "steering": steer_info}
    write_json(args.out, report)
    m = report["metrics"]
    print(f"harmful: refusal {m['harmful_refusal_rate']:.1%}, ASR {m['attack_success_rate']:.1%} "
          f"({m['n_harmful']} prompts); harmless: over-refusal {m['over_refusal_rate']:.1%} "
          f"({m['n_harmless']} prompts); wrote {args.out}")
    if m["n_harmful"] and m["n_harmless"]:
        print(f"strict judge: harmful answered {m['strict_compliance_harmful']:.1%}, refused "
              f"{m['strict_refusal_harmful']:.1%}, degenerate {m['strict_degenerate_harmful']:.1%}; harmless refused "
              f"{m['strict_refusal_harmless']:.1%}, degenerate {m['strict_degenerate_harmless']:.1%}")
    return 0


def _check_steer_args(args: argparse.Namespace) -> None:
    if args.steer is None and (args.directions or args.layer is not None or args.coef is not None):
        raise ValueError("--directions, --layer and --coef only apply with --steer")
    if args.steer is not None and not args.directions:
        raise ValueError("--steer needs --directions")
    if args.steer == "ablate" and (args.layer is not None or args.coef is not None):
        raise ValueError("--layer and --coef apply to --steer add, not ablate")


def _steering(args: argparse.Namespace, loaded: LoadedModel):
    """(context manager, JSON description) for the --steer options."""
    if args.steer is None:
        return contextlib.nullcontext(), None
    ds = load_directions_for(loaded, args.directions)
    if args.steer == "ablate":
        return directional_ablation(loaded.model, ds.directions), {"mode": "ablate", "directions": args.directions,
                                                                   "layers": ds.defined_layers}
    if args.layer is None or args.layer not in ds.defined_layers:
        raise ValueError(f"--steer add needs --layer, one of the layers with a direction: {ds.defined_layers}")
    coef = ds.norms[args.layer].item() if args.coef is None else args.coef
    return (activation_addition(loaded.model, ds.directions[args.layer], args.layer, coef),
            {"mode": "add", "directions": args.directions, "layer": args.layer, "coef": coef})
