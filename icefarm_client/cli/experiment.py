"""The CLI's experiment commands: evaluate bitstreams, attach and detach boards over usbip."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from icefarm_client.cli.output import CsvLines, JsonLines, Progress, plain, print_json, table
from icefarm_client.errors import IcefarmError
from icefarm_client.models import Result
from icefarm_client.sync import Client

RESULT_COLUMNS = ("bitstream_id", "device_id", "value", "attempt", "run_ms", "error")


def result_row(result: Result) -> tuple[str, str, str, int, str, str]:
    """A result as table/CSV cells."""
    value = "" if result.value is None else f"{result.value:g}"
    run_ms = f"{result.run_duration.total_seconds() * 1000:.1f}"
    return (result.bitstream_id, result.device_id, value, result.attempt, run_ms, result.error)


def evaluate(client: Client, args: argparse.Namespace) -> int:
    """Reserve boards, evaluate the files on them, print every result, release. `--csv` and
    `--jsonl` write each result the moment it arrives (Ctrl-C keeps what was written); the
    table and `--json` come at the end, in the order of the files."""
    chosen = [flag for flag in ("json", "csv", "jsonl") if getattr(args, flag, False)]
    if len(chosen) > 1:
        print("icefarm: error: evaluate: choose one of --json, --csv, --jsonl", file=sys.stderr)
        return 2
    paths = [Path(p) for p in args.files]
    for path in paths:
        if not path.is_file():
            raise IcefarmError(f"{path}: no such file")
    count = args.count or max(1, min(len(paths), client.availability(args.selector).count))
    results: list[Result] = []
    progress = Progress(len(paths), "evaluating ")
    with client.reserve(count, mode=args.mode, selector=args.selector, wait=args.wait) as farm:
        write = _streamed_output(args)
        try:
            for result in farm.evaluate(paths, in_flight=args.in_flight):
                results.append(result)
                write(result)
                progress.advance(failed=not result.ok)
        finally:
            progress.close()
    if not (args.csv or args.jsonl):
        _print_sorted(results, paths, count, args.json)
    return 0 if all(r.ok for r in results) else 1


def _streamed_output(args: argparse.Namespace) -> Callable[[Result], None]:
    """What to do with each result as it arrives: write a CSV or JSON Lines line, or
    nothing (the table and --json are printed at the end)."""
    if args.jsonl:
        return JsonLines().write
    if args.csv:
        lines = CsvLines(RESULT_COLUMNS)
        return lambda result: lines.write(result_row(result))
    return lambda result: None


def _print_sorted(results: list[Result], paths: list[Path], count: int, as_json: bool) -> None:
    order = {str(p): i for i, p in enumerate(paths)}
    results = sorted(results, key=lambda r: order.get(r.bitstream_id, len(order)))
    if as_json:
        print_json(results)
        return
    table([c.upper() for c in RESULT_COLUMNS], (result_row(r) for r in results))
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} evaluated, {failed} failed on {count} board(s)")


def _usbip() -> str:
    tool = shutil.which("usbip")
    if tool is None:
        raise IcefarmError(
            "the usbip tool is not installed (on Debian/Ubuntu: apt install usbip, "
            "or linux-tools-generic)"
        )
    return tool


def attach(client: Client, args: argparse.Namespace) -> int:
    """Export a held usbip-mode board from its worker and attach it here."""
    tool = _usbip()
    found = [r for r in client.reservations() if r.id == args.reservation]
    if not found:
        raise IcefarmError(f"no active reservation {args.reservation} of {client.client_id}")
    # Extending by a second never moves the lease end earlier; it hands out a fresh token.
    (fresh,) = client.extend(args.reservation, duration=timedelta(seconds=1))
    device_ids = args.device or list(fresh.device_ids)
    exports = [client.export(fresh, device_id) for device_id in device_ids]
    for info in exports:
        command = [tool, "--tcp-port", str(info.port), "attach", "-r", info.host, "-b", info.bus_id]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip().splitlines()
            raise IcefarmError(
                f"usbip attach failed: {message[-1] if message else done.returncode}"
            )
    if args.json:
        print_json(exports)
    else:
        table(("DEVICE", "HOST", "PORT", "BUS ID"), ((e.device_id, e.host, e.port, e.bus_id)
                                                      for e in exports))  # fmt: skip
    return 0


def detach(client: Client, args: argparse.Namespace) -> int:
    """Detach a usbip port on this host (`usbip port` lists them)."""
    tool = _usbip()
    done = subprocess.run([tool, "detach", "-p", str(args.port)], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise IcefarmError(f"usbip detach failed: {message[-1] if message else done.returncode}")
    if args.json:
        print_json(plain({"port": args.port, "detached": True}))
    else:
        print(f"detached port {args.port}")
    return 0
