"""`icefarm-control`: serve the control, or manage its database."""

from __future__ import annotations

import argparse
import asyncio
import sys

from sqlalchemy.exc import DBAPIError

from icefarm import __version__
from icefarm.logs import configure_logging
from icefarm_control.app import ControlApp
from icefarm_control.config import ConfigError, add_arguments, environment_warnings, resolve
from icefarm_control.storage.database import Database
from icefarm_control.storage.migrate import current_revision, head_revision, upgrade
from icefarm_control.transport.server import BindError

# What `db upgrade` and `db current` use.
DB_SETTINGS = ("database", "log_format", "log_level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icefarm-control",
        description="The iCEFARM control: hands out devices, keeps the farm's state.",
        epilog="Settings come from flags, then ICEFARM_* environment variables, then the "
        "TOML file given by --config, then defaults.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the gRPC API (runs database migrations first)",
        description="Serve ReservationService and ControlService with health checking and "
        "reflection. SIGTERM: health goes NOT_SERVING, in-flight calls finish within "
        "--shutdown-grace, then the process exits 0.",
    )
    add_arguments(serve)
    db = commands.add_parser("db", help="database schema commands")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    for name, text in (
        ("upgrade", "migrate the schema to the newest revision"),
        ("current", "print the schema revision of the database and the newest one"),
    ):
        sub = db_commands.add_parser(name, help=text, description=text)
        add_arguments(sub, only=DB_SETTINGS)
    return parser


async def _db(command: str, url: str) -> None:
    database = Database(url)
    try:
        if command == "upgrade":
            await upgrade(database)
        print(f"database revision {await current_revision(database)} (newest {head_revision()})")
    finally:
        await database.dispose()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # First: a misspelt variable is often why a setting below is wrong.
    for warning in environment_warnings():
        print(f"icefarm-control: warning: {warning}", file=sys.stderr)
    try:
        config = resolve(args)
    except ConfigError as exc:
        print(f"icefarm-control: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    try:
        if args.command == "db":
            asyncio.run(_db(args.db_command, config.database))
        else:
            asyncio.run(ControlApp(config).run_until_signalled())
    except (BindError, ValueError, OSError) as exc:
        print(f"icefarm-control: {exc}", file=sys.stderr)
        return 1
    except DBAPIError as exc:
        # The driver's message spans several lines; the first says what went wrong.
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        print(f"icefarm-control: cannot use the database: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
