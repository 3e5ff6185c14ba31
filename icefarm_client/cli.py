"""`icefarm` command line (the full command arrives with the client work)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "icefarm: this command is not built yet; see README.md for what works today",
        file=sys.stderr,
    )
    return 1
