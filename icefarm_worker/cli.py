"""`icefarm-worker`: run the worker daemon, ask a running one to drain, or change a device's
labels and properties on the worker running on this host (`set-device`).

Exit codes: 0 done (a drained worker exits 0), 1 an error at run time (one line on stderr),
2 bad usage or configuration (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import grpc

from icefarm import __version__
from icefarm.labels import key_problem
from icefarm.logs import configure_logging
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm.v1 import worker_service_pb2_grpc as wpb_grpc
from icefarm_worker.app import BindError, WorkerApp
from icefarm_worker.config import (
    ConfigError,
    add_arguments,
    environment_warnings,
    parse_seconds,
    resolve,
)

PROG = "icefarm-worker"
# Where `set-device` finds the worker when neither --worker nor ICEFARM_WORKER_LISTEN says.
DEFAULT_WORKER_PORT = 50052
SET_DEVICE_TIMEOUT = 5.0


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
    _add_set_device(commands)
    return parser


def _add_set_device(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    set_device = commands.add_parser(
        "set-device",
        help="change a device's labels and properties on the worker running on this host",
        description="Merge labels and properties into DEVICE on the worker running on this "
        "host (UpdateDevice over its gRPC port, accepted only from loopback). KEY= with no "
        "value removes the key. The control sees the change within a second, so selectors "
        "such as status=idle match at once. Prints the device's labels and properties after "
        "the change as one JSON line.",
        epilog="example: icefarm-worker set-device gpu-box-1 --label status=busy "
        "--label job= --property load=0.7",
    )
    set_device.add_argument("device", metavar="DEVICE", help="the device id")
    set_device.add_argument(
        "--label",
        dest="labels",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a label (KEY= removes it; repeatable)",
    )
    set_device.add_argument(
        "--property",
        dest="properties",
        action="append",
        default=[],
        metavar="KEY=NUMBER",
        help="set a numeric property (KEY= removes it; repeatable)",
    )
    set_device.add_argument(
        "--worker",
        metavar="HOST:PORT",
        default=None,
        help="the worker's WorkerService address (default: 127.0.0.1 and the port of "
        f"ICEFARM_WORKER_LISTEN, else {DEFAULT_WORKER_PORT})",
    )


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


def _assignment(item: str, flag: str) -> tuple[str, str]:
    """'KEY=VALUE' → (KEY, VALUE); ValueError naming the flag."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"{flag} {item!r}: must be KEY=VALUE (KEY= removes the key)")
    problem = key_problem(key)
    if problem:
        raise ValueError(f"{flag} {item!r}: {problem}")
    return key, value


def _set_device_request(args: argparse.Namespace) -> wpb.UpdateDeviceRequest:
    """The UpdateDeviceRequest the flags describe; ValueError naming the bad flag."""
    labels = dict(_assignment(item, "--label") for item in args.labels)
    properties: dict[str, float] = {}
    for item in args.properties:
        key, text = _assignment(item, "--property")
        if not text:
            properties[key] = math.nan  # NaN removes a property
            continue
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"--property {item!r}: {text!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"--property {item!r}: must be a finite number")
        properties[key] = number
    return wpb.UpdateDeviceRequest(device_id=args.device, labels=labels, properties=properties)


def _worker_address(args: argparse.Namespace) -> str:
    if args.worker:
        return str(args.worker)
    port = os.environ.get("ICEFARM_WORKER_LISTEN", "").rpartition(":")[2]
    return f"127.0.0.1:{port if port.isdigit() and port != '0' else DEFAULT_WORKER_PORT}"


async def _update_device(
    address: str, request: wpb.UpdateDeviceRequest
) -> wpb.UpdateDeviceResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wpb_grpc.WorkerServiceStub(channel)
        answer: wpb.UpdateDeviceResponse = await stub.UpdateDevice(
            request, timeout=SET_DEVICE_TIMEOUT
        )
        return answer


def _set_device(args: argparse.Namespace) -> int:
    try:
        request = _set_device_request(args)
    except ValueError as exc:
        return _fail(f"set-device: {exc}", 2)
    address = _worker_address(args)
    try:
        answer = asyncio.run(_update_device(address, request))
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return _fail(f"set-device: no worker answering at {address} (--worker HOST:PORT)", 1)
        return _fail(f"set-device: {exc.details()}", 1)
    record = {
        "device_id": answer.device_id,
        "labels": dict(sorted(answer.labels.items())),
        "properties": dict(sorted(answer.properties.items())),
    }
    print(json.dumps(record))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `icefarm-worker` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "drain":
        return _drain(args)
    if args.command == "set-device":
        return _set_device(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
