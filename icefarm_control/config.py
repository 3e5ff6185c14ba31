"""Control configuration: command-line flags, then ICEFARM_* environment variables, then an
optional TOML file (--config or ICEFARM_CONFIG), then the defaults below."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from icefarm.settings import (
    CLIENT_VARIABLES,
    OTHER_PREFIXES,
    Setting,
    format_duration,
    layered_values,
    unknown_variables,
    with_default,
)
from icefarm.settings import ConfigError as ConfigError
from icefarm_control.domain.settings import Timers
from icefarm_control.storage.database import DEFAULT_DB_CONCURRENCY, default_database_url

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> timedelta:
    """'90', '90s', '1500ms', '5m', '2h', '1d' → timedelta."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 5m, 2h)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _listen(text: str) -> str:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return str(text)


def _log_format(text: str) -> str:
    if text not in ("console", "json"):
        raise ValueError("must be 'console' or 'json'")
    return text


def _log_level(text: str) -> str:
    if text.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError("must be debug, info, warning or error")
    return text.lower()


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _token_key(text: str) -> str:
    # Empty means "the key in the database" (made at its first start); anything else seeds
    # that key and must match it afterwards, so it must be long enough to sign with.
    if text and len(text.encode()) < 16:
        raise ValueError("must be at least 16 characters")
    return text


_T = Timers()
SETTINGS: tuple[Setting, ...] = (
    Setting("listen", _listen, "gRPC address to serve on"),
    Setting(
        "database",
        str,
        "database URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB "
        "(default: control.db in the user's data directory)",
    ),
    Setting("log_format", _log_format, "console or json"),
    Setting("log_level", _log_level, "debug, info, warning or error"),
    Setting("default_lease", parse_duration, "lease when Reserve names none"),
    Setting(
        "ending_soon_before",
        parse_duration,
        "how long before a lease ends holders are warned",
    ),
    Setting(
        "heartbeat_interval",
        parse_duration,
        "worker heartbeat period, at most half of offline_timeout "
        "(default: a third of offline_timeout, at most 5s)",
    ),
    Setting(
        "offline_timeout",
        parse_duration,
        "silence after which a worker is offline",
    ),
    Setting(
        "worker_grace",
        parse_duration,
        "how long an offline worker's reservations survive",
    ),
    Setting(
        "client_grace",
        parse_duration,
        "how long a client's reservations survive without a Session (0 disables)",
    ),
    Setting(
        "event_retention",
        parse_duration,
        "how long events stay in the outbox for clients and dashboards to resume from",
    ),
    Setting(
        "command_timeout",
        parse_duration,
        "how long a worker may take to answer a command before its device is broken",
    ),
    Setting(
        "handshake_timeout",
        parse_duration,
        "how long a new WorkerSession may take to send Register",
    ),
    Setting(
        "drain_timeout",
        parse_duration,
        "how long a drain waits for reservations when none is given",
    ),
    Setting(
        "shutdown_grace",
        parse_duration,
        "on SIGTERM, how long in-flight calls may finish",
    ),
    Setting(
        "token_key",
        _token_key,
        "optional secret (16+ characters) the database's token signing key is derived from "
        "when the database has none yet; a replica whose token_key does not match the "
        "database's key refuses to start (default: the database's key, random at first start)",
    ),
    Setting("db_pool_size", _positive_int, "PostgreSQL connections per replica"),
    Setting(
        "db_concurrency",
        _positive_int,
        "Reserve/Release statements one replica runs on PostgreSQL at once; more wait their "
        "turn in arrival order (default: 3 x the CPU count)",
    ),
)


@dataclass(frozen=True)
class ControlConfig:
    listen: str = "127.0.0.1:50051"
    database: str = field(default_factory=default_database_url)
    log_format: str = "console"
    log_level: str = "info"
    default_lease: timedelta = _T.default_lease
    ending_soon_before: timedelta = _T.ending_soon_before
    heartbeat_interval: timedelta = _T.heartbeat_interval
    offline_timeout: timedelta = _T.offline_timeout
    worker_grace: timedelta = _T.worker_grace
    client_grace: timedelta = _T.client_grace
    event_retention: timedelta = _T.event_retention
    command_timeout: timedelta = _T.command_timeout
    handshake_timeout: timedelta = _T.handshake_timeout
    drain_timeout: timedelta = _T.drain_timeout
    shutdown_grace: timedelta = timedelta(seconds=10)
    token_key: str = ""
    db_pool_size: int = 10
    db_concurrency: int = DEFAULT_DB_CONCURRENCY

    @property
    def timers(self) -> Timers:
        return Timers(
            default_lease=self.default_lease,
            ending_soon_before=self.ending_soon_before,
            heartbeat_interval=self.heartbeat_interval,
            offline_timeout=self.offline_timeout,
            worker_grace=self.worker_grace,
            client_grace=self.client_grace,
            event_retention=self.event_retention,
            command_timeout=self.command_timeout,
            handshake_timeout=self.handshake_timeout,
            drain_timeout=self.drain_timeout,
        )


def add_arguments(parser: argparse.ArgumentParser, only: Iterable[str] | None = None) -> None:
    """The settings as flags: all of them, or `only` these (a command that uses fewer)."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with any of the settings below (ICEFARM_CONFIG)"
    )
    wanted = None if only is None else set(only)
    defaults = {f.name: f.default for f in dataclasses.fields(ControlConfig)}
    for setting in SETTINGS:
        if wanted is not None and setting.name not in wanted:
            continue
        default = defaults.get(setting.name)
        text = with_default(setting.help, None if default is dataclasses.MISSING else default)
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            metavar=setting.name.split("_")[-1].upper(),
            help=f"{text} [{setting.env}]",
        )


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ControlConfig:
    """Each setting from the first place that has it: flag, environment, TOML file, default."""
    environ = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or environ.get("ICEFARM_CONFIG")
    if config_path:
        try:
            file_values = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config_path}: {exc}") from exc
        known = {s.name for s in SETTINGS}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise ConfigError(f"config file {config_path}: unknown setting {unknown[0]!r}")
    values = layered_values(SETTINGS, args, environ, file_values, config_path)
    _fit_heartbeat(values)
    return ControlConfig(**values)


def environment_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """ICEFARM_* variables that are no setting of the control (nor the client's, nor the
    worker's ICEFARM_WORKER_*): each a warning naming the closest setting."""
    known = {s.env for s in SETTINGS} | {"ICEFARM_CONFIG"}
    return unknown_variables(
        os.environ if environ is None else environ,
        "ICEFARM_",
        known,
        CLIENT_VARIABLES | set(OTHER_PREFIXES),
    )


def _fit_heartbeat(values: dict[str, Any]) -> None:
    """A worker must be able to miss a heartbeat without going offline: the heartbeat is at
    most half the offline timeout. Unset, it follows a short offline timeout down (a third of
    it); set too long, it is an error."""
    offline: timedelta = values.get("offline_timeout", _T.offline_timeout)
    heartbeat: timedelta | None = values.get("heartbeat_interval")
    if heartbeat is None:
        values["heartbeat_interval"] = min(_T.heartbeat_interval, offline / 3)
    elif heartbeat * 2 > offline:
        raise ConfigError(
            f"heartbeat_interval ({format_duration(heartbeat)}) must be at most half of "
            f"offline_timeout ({format_duration(offline)}): a worker would go offline "
            "after one late heartbeat"
        )
