"""The ``fastprocon`` command line: one subcommand per module.

Each module listed in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser and
sets ``func=`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
Modules are imported lazily so ``fastprocon <cmd> --help`` only imports what ``<cmd>`` needs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that registers it
COMMANDS = {
    "train": "fastprocon.train.cli",
    "directions": "fastprocon.directions",
    "reference": "fastprocon.reference",
    "drift": "fastprocon.drift",
    "eval-refusal": "fastprocon.evaluate",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastprocon", description="Fast ProCon fine-tuning (arXiv 2509.06795).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see fastprocon {name} --help)")
            continue
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only=wanted).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
