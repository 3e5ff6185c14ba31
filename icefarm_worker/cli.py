"""`icefarm-worker`: run the worker daemon, or ask a running one to drain.

Exit codes: 0 done (a drained worker exits 0), 1 an error at run time (one line on stderr),
2 bad usage or configuration (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from icefarm import __version__
from icefarm.logs import configure_logging
from icefarm_worker.app import BindError, WorkerApp
from icefarm_worker.config import (
    ConfigError,
    add_arguments,
    environment_warnings,
    parse_seconds,
    resolve,
)

PROG = "icefarm-worker"


def build_parser() -> argparse.ArgumentParser:
    """The `icefarm-worker` argument parser (run, drain)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The iCEFARM worker: keeps this host's boards healthy and runs them for "
        "the reservations the control hands out.",
        epilog="Settings come from flags, then ICEFARM_WORKER_* environment variables, then "
        "the TOML file given by --config, then defaults.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run the worker daemon",
        description="Find the boards, connect to the control (retrying forever), and serve "
        "WorkerService with health checking and reflection. SIGTERM or SIGINT drains: no new "
        "reservations, wait for the last one to end (or --drain-timeout), exit 0; a second "
        "signal stops at once.",
    )
    add_arguments(run)
    drain = commands.add_parser(
        "drain",
        help="drain the worker running on this host (SIGTERM to the pid in its pid file)",
        description="Send SIGTERM to the worker whose pid is in PID_FILE (written by "
        "`run --pid-file`), then optionally wait for it to exit.",
    )
    drain.add_argument(
        "--pid-file",
        default=os.environ.get("ICEFARM_WORKER_PID_FILE"),
        help="the worker's pid file [ICEFARM_WORKER_PID_FILE]",
    )
    drain.add_argument(
        "--wait",
        metavar="DURATION",
        default="0",
        help="wait this long for the worker to exit (e.g. 15m; 0: do not wait)",
    )
    return parser


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _drain(args: argparse.Namespace) -> int:
    if not args.pid_file:
        return _fail("drain: --pid-file is required (or ICEFARM_WORKER_PID_FILE)", 2)
    try:
        wait = parse_seconds(args.wait)
    except ValueError as exc:
        return _fail(f"--wait: {exc}", 2)
    try:
        pid = int(Path(args.pid_file).read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError) as exc:
        return _fail(f"drain: cannot signal the worker in {args.pid_file}: {exc}", 1)
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.1)
    if wait:
        return _fail(f"drain: worker {pid} still running after {args.wait}", 1)
    return 0


def _run(args: argparse.Namespace) -> int:
    # First: a misspelt variable is often why a setting below is wrong.
    for warning in environment_warnings():
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    try:
        config = resolve(args)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    configure_logging(config.log_format, config.log_level)
    pid_file = Path(config.pid_file) if config.pid_file else None
    try:
        if pid_file is not None:
            pid_file.write_text(f"{os.getpid()}\n")
        asyncio.run(WorkerApp(config).run_until_signalled())
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except (BindError, OSError, RuntimeError, ValueError) as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `icefarm-worker` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "drain":
        return _drain(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
