"""`python -m icefarm_worker.simulator serve --count N --root DIR`: simulated boards in their
own process, for a worker started with `--simulate-root DIR` (see docs/worker.md)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from icefarm_worker.config import parse_seconds
from icefarm_worker.simulator.attached import serve


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m icefarm_worker.simulator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run simulated boards until SIGTERM")
    run.add_argument("--count", type=int, required=True, help="how many boards")
    run.add_argument("--root", type=Path, required=True, help="directory for ports and drives")
    run.add_argument("--prefix", default="sim", help="device ids are PREFIX-000, ... (sim)")
    run.add_argument(
        "--circuit-time",
        type=parse_seconds,
        default=0.0,
        metavar="SECONDS",
        help="how long a pulsecount/varmax board takes per bitstream once received (0)",
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    args.root.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.count, args.root, prefix=args.prefix, circuit_seconds=args.circuit_time))


if __name__ == "__main__":
    main()
