"""The ``fastprocon`` command line: one subcommand per module.

Each module listed in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser and
sets ``func=`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
Modules are imported lazily so ``fastprocon <cmd> --help`` only imports what ``<cmd>`` needs.

The tools raise ValueError / FileNotFoundError for bad input (arguments, files, data); :func:`main`
prints those as ``fastprocon <cmd>: error: <message>`` and returns 2, as argparse does for a bad
option. Set ``FASTPROCON_TRACEBACK=1`` to get the traceback instead.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# What the tools raise for bad input; anything else is a bug and keeps its traceback.
# (UnicodeDecodeError and data/examples.py's row errors are ValueErrors.)
USER_ERRORS = (ValueError, FileNotFoundError)
# OSError numbers of a write that cannot be done (a full, read-only or size-limited file system)
CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}

# subcommand -> module that registers it
COMMANDS = {
    "train": "fastprocon.cli.train",
    "directions": "fastprocon.cli.directions",
    "reference": "fastprocon.cli.reference",
    "drift": "fastprocon.cli.drift",
    "eval-refusal": "fastprocon.cli.evaluate",
    "report": "fastprocon.cli.report",
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
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("FASTPROCON_TRACEBACK") == "1":
            raise
        print(f"fastprocon {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:   # a full or read-only disk: the path, not a traceback (exit 1, as train)
        if os.environ.get("FASTPROCON_TRACEBACK") == "1" or err.filename is None or err.errno not in CANNOT_WRITE:
            raise
        print(f"fastprocon {args.command}: error: cannot write {err.filename}: {err.strerror or err}", file=sys.stderr)
        return 1

