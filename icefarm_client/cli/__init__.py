"""The `icefarm` command: tables for people, `--json` for scripts.

Exit codes: 0 ok; 1 an error (unreachable control, a server error, a bad selector), printed
as one line on stderr; 2 a usage error; 130 interrupted. Never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta

from icefarm import __version__
from icefarm.logs import configure_logging
from icefarm_client.cli import commands, experiment
from icefarm_client.cli.completion import script
from icefarm_client.connection import RetryPolicy
from icefarm_client.convert import to_timedelta
from icefarm_client.errors import IcefarmError, InvalidArgument
from icefarm_client.models import DeviceState
from icefarm_client.sync import Client

Command = Callable[[Client, argparse.Namespace], int]


def duration(text: str) -> timedelta:
    """`90`, `90s`, `1500ms`, `5m`, `2h`, `1d`, `1h30m` → timedelta (argparse type): the
    library's own reading, so the CLI and Python take the same durations."""
    try:
        return to_timedelta(text)
    except InvalidArgument:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90s, 5m, 2h)") from None


def _connection(parser: argparse.ArgumentParser, default: object) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--control", default=default, help="HOST:PORT [ICEFARM_CONTROL]")
    group.add_argument("--client-id", default=default, help="identity [ICEFARM_CLIENT_ID]")
    group.add_argument("--token", default=default, help="bearer token [ICEFARM_TOKEN]")
    group.add_argument("--tls-ca", default=default, help="CA file; enables TLS [ICEFARM_TLS_CA]")
    parser.add_argument("--json", action="store_true", default=default, help="JSON output")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class DefaultsShown(argparse.HelpFormatter):
    """--help says each option's default, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        quiet = default is None or default is False or default in ("", [], 0, argparse.SUPPRESS)
        if action.option_strings and not quiet and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="icefarm", description="Reserve FPGA boards of an iCEFARM and run bitstreams on them."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _connection(parser, None)
    parser.set_defaults(json=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, run: Command | None, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=DefaultsShown
        )
        _connection(p, argparse.SUPPRESS)
        p.set_defaults(run=run)
        return p

    command("status", commands.status, "a summary of the farm")
    command("workers", commands.workers, "list the workers")
    p = command("devices", commands.devices, "list devices matching a selector")
    p.add_argument("selector", nargs="?", default="", help="e.g. kind=pico2-ice,worker=lab-a")
    p.add_argument(
        "--state",
        type=str.lower,
        choices=[s.value.lower() for s in DeviceState if s is not DeviceState.UNSPECIFIED],
        help="only devices in this state",
    )

    p = command("reserve", commands.reserve, "reserve boards (held until the lease ends)")
    p.add_argument("count", type=int, nargs="?", default=0, help="how many devices")
    p.add_argument("--mode", default="", help="pulsecount, varmax, usbip ...")
    p.add_argument("--selector", default="", help="which devices qualify")
    p.add_argument("--device", nargs="+", metavar="ID", help="exactly these devices")
    p.add_argument("--wait", type=duration, help="queue this long for free devices (e.g. 5m)")
    p.add_argument("--duration", type=duration, help="lease length (default: the control's)")

    p = command("extend", commands.extend, "extend reservations (all when none is named)")
    p.add_argument("ids", nargs="*", metavar="RESERVATION")
    p.add_argument("--all", action="store_true", help="every active reservation")
    p.add_argument("--duration", type=duration, help="new lease length from now")

    p = command("release", commands.release, "release reservations or devices")
    p.add_argument("ids", nargs="*", metavar="RESERVATION")
    p.add_argument("--device", nargs="+", default=[], metavar="ID", help="just these devices")
    p.add_argument("--all", action="store_true", help="everything this client holds")

    p = command("reservations", commands.reservations, "list this client's reservations")
    p.add_argument("--all", action="store_true", help="include ended ones")

    p = command("evaluate", experiment.evaluate, "evaluate bitstream files on reserved boards")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--mode", default="pulsecount", help="pulsecount (default) or varmax")
    p.add_argument("--count", type=int, default=0, help="boards (default: free ones, ≤ files)")
    p.add_argument("--selector", default="", help="which boards qualify")
    p.add_argument("--wait", type=duration, help="queue this long for free boards")
    p.add_argument("--in-flight", type=int, default=2, help="bitstreams queued per board")
    p.add_argument("--csv", action="store_true", help="CSV output, a line per result as it comes")
    p.add_argument(
        "--jsonl", action="store_true", help="JSON Lines output, a line per result as it comes"
    )

    p = command("watch", commands.watch, "the live event feed of the whole farm")
    p.add_argument("--resume-after", type=int, default=0, help="replay events after this one")
    p.add_argument("--limit", type=int, default=0, help="stop after this many events")

    p = command("attach", experiment.attach, "attach usbip-mode boards of a reservation here")
    p.add_argument("reservation")
    p.add_argument("--device", nargs="+", metavar="ID", help="only these boards")
    p = command("detach", experiment.detach, "detach a usbip port on this host")
    p.add_argument("port", type=int, help="the port `usbip port` shows")

    p = command("demo", None, "run a control and 8 simulated boards locally and use them")
    p.add_argument("--keep-running", action="store_true", help="stay up until Ctrl-C")
    p.add_argument("--boards", type=int, default=8, help="simulated boards")
    p.add_argument("--count", type=int, default=4, help="boards to reserve")
    p.add_argument("--bitstreams", type=int, default=40, help="bitstreams to evaluate")
    p = command("completion", None, "print a shell completion script")
    p.add_argument("shell", choices=("bash", "zsh"))
    return parser


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.control,
        client_id=args.client_id,
        token=args.token,
        tls_ca=args.tls_ca,
        retry=RetryPolicy(attempts=3, initial_backoff=0.1, max_backoff=0.5),
        timeout=15.0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `icefarm` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The library's own warnings (a feed reconnecting) go to stderr, never into the output.
    level = os.environ.get("ICEFARM_LOG_LEVEL", "warning").lower()
    configure_logging("console", level if level in LOG_LEVELS else "warning")
    if args.command == "reserve" and args.count <= 0 and not args.device:
        parser.error("reserve: give a count > 0 or --device IDs")
    if args.command == "release" and not (args.all or args.ids or args.device):
        parser.error("release: name reservation ids, --device IDs or --all")
    try:
        if args.command == "completion":
            sys.stdout.write(script(parser, args.shell))
            return 0
        if args.command == "demo":
            try:
                from icefarm_client.demo import run_demo
            except ImportError as missing:  # a client-only install: no control, no worker
                print(
                    f"icefarm: error: the demo runs a control and a worker, which this install "
                    f"lacks ({missing.name}): pip install 'icefarm-grpc[all]'",
                    file=sys.stderr,
                )
                return 2
            return run_demo(args)
        with _client(args) as client:
            code: int = args.run(client, args)
            return code
    except IcefarmError as error:
        print(f"icefarm: error: {error.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except OSError as error:
        print(f"icefarm: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("icefarm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
