"""``python -m fastprocon.cli`` (what torchrun runs): the ``fastprocon`` command."""
import sys

from fastprocon.cli.dispatch import main

sys.exit(main())
