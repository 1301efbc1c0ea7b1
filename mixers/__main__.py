"""``python -m mixers ARGS``: the same as ``seqmixers ARGS`` (``models.cli``), same output and exit codes.

The layering rule is that ``mixers`` never imports ``models``; this module keeps it at import time and reaches
the command only when it runs: ``main`` imports ``models.cli`` through ``importlib`` at call time (both
packages ship in the one ``seqmixers`` distribution).
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``seqmixers`` with ``argv`` (default: the process's arguments) and return its exit code."""
    cli = importlib.import_module("models.cli")  # at call time: mixers does not depend on models at import
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
