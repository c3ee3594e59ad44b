"""``fastprocon train``: the command-line entry point of the trainer."""
from __future__ import annotations

import argparse
import errno
import os
import sys

from fastprocon.train.config import CONFIG_DIR, SECTIONS
from fastprocon.train.signals import STOP_EXIT_STATUS

DESCRIPTION = """\
Instruction fine-tuning with the ProCon projection constraint at every decoder-layer input
(Du et al. 2025): loss = CE + alpha * mean over samples of the sum over layers and response
tokens of |r_l . h_l - z0_l|. Refusal directions r and reference projections z0 are made on
the fly when their files are absent. FSDP2 on one or many processes (torchrun)."""

EPILOG = """\
overrides: key=value or section.key=value (sections: {sections});
the value is a TOML value (0.1, true, [1, 2], "text"; a bare word is a string);
--print-config lists every key.
examples:
  fastprocon train                      # built-in default: SmolLM2, ProCon_wu_safe, built-in data
  fastprocon train --config tiny max_steps=20 alpha=0.2
  fastprocon train --config my.toml schedule=constant alpha=0.1 name=procon_s
  torchrun --nproc_per_node=8 -m fastprocon.cli train --config my.toml
  torchrun --nnodes=2 --node_rank=N --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
      -m fastprocon.cli train --config my.toml      # on each node; run_dir on a shared filesystem
built-in configs: {configs}.
The run directory (train.run_dir, default runs/<name>) gets config.toml (resolved),
metrics.jsonl, directions.safetensors, reference.safetensors, checkpoints/, model/ (Hugging
Face export with the directions file) and summary.json. A rerun with the same run directory
resumes from its latest checkpoint (checkpoint.resume = "auto"), on any number of processes.
SIGTERM or SIGINT during the steps: the current step finishes, a checkpoint is written, one
line says so, exit status {stop_status} (rerun to resume).
exit status: 0 done, 1 stopped on a non-finite loss or an unwritable run directory, 2 bad input,
{stop_status} stopped by a signal.
"""


def register(subparsers) -> None:
    configs = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    p = subparsers.add_parser(
        "train", help="fine-tune a model with ProCon (FSDP2; single process or torchrun)",
        description=DESCRIPTION,
        epilog=EPILOG.format(sections=", ".join(SECTIONS), configs=configs, stop_status=STOP_EXIT_STATUS),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default",
                   help="TOML config file, or the name of a built-in config (default: 'default')")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastprocon.train.config import load_config, to_toml

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fastprocon train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    from fastprocon.train.prepare import run_dir_of
    from fastprocon.train.run import train
    from fastprocon.train.signals import Interrupted
    from fastprocon.train.trainer import NonFiniteError

    try:
        result = train(cfg)
    except NonFiniteError as err:
        print(f"fastprocon train: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:   # outside the steps (set-up, export): nothing new to save
        if _is_main():
            latest = _latest_checkpoint(run_dir_of(cfg))
            print(f"fastprocon train: stopped by {err.name} outside the training steps; checkpoint "
                  f"{latest or '(none yet)'}; rerun to resume", file=sys.stderr)
        return STOP_EXIT_STATUS
    except OSError as err:   # a run directory made read-only or full: the path, not a traceback
        if os.environ.get("FASTPROCON_TRACEBACK") == "1" or err.filename is None or err.errno not in _CANNOT_WRITE:
            raise
        print(f"fastprocon train: error: cannot write {err.filename}: {err.strerror or err}", file=sys.stderr)
        return 1
    if result.stopped_by is not None:
        if _is_main():
            print(f"stopped by {result.stopped_by} at step {result.final_step}; checkpoint {result.checkpoint}; "
                  "rerun to resume", file=sys.stderr)
        return STOP_EXIT_STATUS
    if _is_main():
        _report(result)
    return 0


_CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def _latest_checkpoint(run_dir) -> str | None:
    from fastprocon.train.checkpoint import LATEST
    pointer = run_dir / "checkpoints" / LATEST
    name = pointer.read_text().strip() if pointer.is_file() else ""
    return str(pointer.parent / name) if name else None


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _report(result) -> None:
    last = result.metrics[-1] if result.metrics else None
    lines = [f"trained steps {result.start_step + 1}-{result.final_step} in {result.seconds:.0f} s"
             if result.final_step > result.start_step else f"nothing to do: already at step {result.final_step}"]
    if last:
        procon = f", ProCon {last['procon']:.4g}" if last.get("procon") is not None else ""
        lines.append(f"last logged: step {last['step']}, CE {last['ce']:.4f}{procon}, "
                     f"{last['tokens_per_s']:.0f} tokens/s")
    if result.stopped:
        lines.append(f"stopped early: {result.stopped}")
    lines.append(f"run directory: {result.run_dir}  (metrics.jsonl, config.toml, summary.json)")
    if result.checkpoint:
        lines.append(f"checkpoint:    {result.checkpoint}")
    if result.export_dir:
        extra = ", with directions.safetensors" if (result.export_dir / "directions.safetensors").exists() else ""
        lines.append(f"exported model: {result.export_dir}  (Hugging Face format{extra})")
    print("\n".join(lines))
