"""The ``fastprocon`` command line (the top layer: only here may functions import fastprocon lazily,
so ``fastprocon <cmd> --help`` imports only what ``<cmd>`` needs)."""
from fastprocon.cli.dispatch import main

__all__ = ["main"]
