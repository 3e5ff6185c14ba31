"""Settings resolved in layers — command-line flag, then environment variable, then TOML file —
shared by `icefarm-control` and `icefarm-worker`."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A setting could not be used; the message names where it came from."""


@dataclass(frozen=True)
class Setting:
    """One scalar setting: its flag, environment variable and TOML key derive from `name`."""

    ENV_PREFIX: ClassVar[str] = "ICEFARM_"

    name: str
    parse: Callable[[str], Any]
    help: str

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return self.ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        """The command-line flag that sets it."""
        return "--" + self.name.replace("_", "-")


def layered_values(
    settings: Iterable[Setting],
    args: argparse.Namespace,
    environ: Mapping[str, str],
    file_values: Mapping[str, Any],
    config_path: str | None,
) -> dict[str, Any]:
    """Each setting from the first place that has it (flag, environment, file), parsed; the
    ones found nowhere are left out (their defaults apply). ConfigError names the source."""
    values: dict[str, Any] = {}
    for setting in settings:
        for source, raw in (
            (setting.flag, getattr(args, setting.name, None)),
            (setting.env, environ.get(setting.env)),
            (f"{config_path}: {setting.name}", file_values.get(setting.name)),
        ):
            if raw is None:
                continue
            try:
                values[setting.name] = setting.parse(str(raw))
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from exc
            break
    return values


def format_duration(value: timedelta) -> str:
    """A duration as people write it, in the units `parse_duration` reads: 7d, 1h30m, 2s,
    1500ms → 1.5s."""
    total = value.total_seconds()
    if total < 0:
        return "-" + format_duration(-value)
    if total < 1:
        return f"{round(total * 1000):d}ms"
    parts = []
    whole = int(total)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    seconds = whole + (total - int(total))
    if seconds:
        parts.append(f"{seconds:g}s" if seconds != int(seconds) else f"{int(seconds)}s")
    return "".join(parts)


# Variables the client library and the `icefarm` CLI read: not typos in a control's or a
# worker's environment.
CLIENT_VARIABLES = frozenset(
    {
        "ICEFARM_CONTROL",
        "ICEFARM_CLIENT_ID",
        "ICEFARM_TOKEN",
        "ICEFARM_TLS",
        "ICEFARM_TLS_CA",
        "ICEFARM_TLS_CERT",
        "ICEFARM_TLS_KEY",
        "ICEFARM_LOG_LEVEL",
    }
)
# Prefixes of variables other parts read: the worker's, and the test suite's own.
OTHER_PREFIXES = ("ICEFARM_WORKER_", "ICEFARM_TEST_", "ICEFARM_SOAK_")


def unknown_variables(
    environ: Mapping[str, str], prefix: str, known: Iterable[str], others: Iterable[str] = ()
) -> list[str]:
    """A warning per `prefix*` environment variable that is not a setting (a typo more often
    than not), naming the closest setting; variables in `others` (read by another part of
    iCEFARM) or under a longer prefix in `others` (e.g. ICEFARM_WORKER_) are left alone."""
    names = set(known)
    elsewhere = set(others)
    warnings = []
    for variable in sorted(environ):
        if not variable.startswith(prefix) or variable in names or variable in elsewhere:
            continue
        if any(o.endswith("_") and variable.startswith(o) for o in elsewhere):
            continue
        close = difflib.get_close_matches(variable, sorted(names), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"unknown environment variable {variable}{hint}: ignored")
    return warnings


def with_default(help_text: str, default: object) -> str:
    """A setting's help with its default as people write it (unless the text says one)."""
    if "default" in help_text or default in (None, "", ()):
        return help_text
    shown = format_duration(default) if isinstance(default, timedelta) else str(default)
    return f"{help_text} (default: {shown})"
