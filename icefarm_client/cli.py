"""`icefarm` command line. Today it runs the demo; the full CLI arrives with the client work."""

from __future__ import annotations

import argparse
import sys

from icefarm_client.demo import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icefarm", description="iCEFARM command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run a control with simulated boards and a short tour")
    demo.add_argument("--boards", type=int, default=8, help="how many simulated boards (even)")
    demo.add_argument(
        "--keep-running", action="store_true", help="keep the control up afterwards (Ctrl-C stops)"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.boards < 2 or args.boards % 2:
            parser.error("--boards must be an even number of at least 2")
        return run_demo(args.boards, keep_running=args.keep_running)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
