"""Worker configuration: command-line flags, then ICEFARM_WORKER_* environment variables, then a
TOML file (--config or ICEFARM_WORKER_CONFIG), then the defaults below.

Tables only a file can express well also have a flat form for flags and the environment:
`[firmware]` is `--firmware NAME=PATH` (repeatable) or `ICEFARM_WORKER_FIRMWARE=NAME=PATH,...`,
`[labels]` is `--label KEY=VALUE` or `ICEFARM_WORKER_LABELS=KEY=VALUE,...`. The simulator's
`[simulator.faults]` table is only read from the file; `[simulator] circuit_seconds` is the
file's name for `--simulate-circuit-time`. Devices that are not USB boards (a GPU box, a
machine) are only declared in the file, as `[[devices]]` tables (see `DeviceDeclaration`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from icefarm import settings
from icefarm.labels import key_problem, value_problem
from icefarm.settings import ConfigError as ConfigError
from icefarm.settings import layered_values, unknown_variables, with_default

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
ENV_PREFIX = "ICEFARM_WORKER_"


def parse_seconds(text: str) -> float:
    """'90', '90s', '1500ms', '5m', '2h', '1d' → seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 5m, 2h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _address(text: str) -> str:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return str(text)


def _addresses(text: str) -> tuple[str, ...]:
    parts = tuple(_address(p.strip()) for p in str(text).split(",") if p.strip())
    if not parts:
        raise ValueError("needs at least one HOST:PORT")
    return parts


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text.lower()

    return parse


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be a whole number ≥ 0")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be a whole number ≥ 1")
    return value


def _name(text: str) -> str:
    if not re.fullmatch(r"[\x21-\x7e]{1,128}", text):
        raise ValueError("must be 1-128 printable ASCII characters without spaces")
    return text


def _pairs(text: str) -> dict[str, str]:
    """'a=1,b=2' → {'a': '1', 'b': '2'}."""
    result: dict[str, str] = {}
    for item in str(text).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not KEY=VALUE")
        result[key.strip()] = value.strip()
    return result


@dataclass(frozen=True)
class Setting(settings.Setting):
    """A worker setting: environment variables start with ICEFARM_WORKER_."""

    ENV_PREFIX: ClassVar[str] = "ICEFARM_WORKER_"


SETTINGS: tuple[Setting, ...] = (
    Setting("control", _addresses, "HOST:PORT of the control (comma-separated to fail over)"),
    Setting("name", _name, "worker name, unique in the farm (default: the host name)"),
    Setting("listen", _address, "address to serve WorkerService on (port 0: any free port)"),
    Setting("advertise", _address, "HOST:PORT clients use to reach it (default: from --listen)"),
    Setting("log_format", _choice("console", "json"), "console or json"),
    Setting("log_level", _choice("debug", "info", "warning", "error"), "log level"),
    Setting("simulate", _count, "run N simulated boards instead of real hardware (0: real)"),
    Setting(
        "boards",
        _choice("usb", "none"),
        "usb: drive the pico2-ice boards on this host's USB; none: no boards (a machine that "
        "offers only [[devices]] from the config file and GPUs; needs no firmware)",
    ),
    Setting(
        "gpus",
        _choice("auto", "off"),
        "auto: each NVIDIA GPU NVML reports is a device (with the [gpu] extra); off: none",
    ),
    Setting(
        "simulate_circuit_time",
        parse_seconds,
        "how long a simulated pulsecount/varmax board takes per bitstream once received "
        "(TOML [simulator] circuit_seconds; default 0)",
    ),
    Setting(
        "simulate_root",
        str,
        "attach to the simulated boards served in DIR by `python -m icefarm_worker.simulator "
        "serve --root DIR` instead of real hardware",
    ),
    Setting("flash_timeout", parse_seconds, "how long flashing one firmware may take"),
    Setting("test_timeout", parse_seconds, "how long the default firmware has to answer"),
    Setting("ready_timeout", parse_seconds, "how long a mode's firmware has to answer"),
    Setting("evaluate_timeout", parse_seconds, "how long one bitstream may take"),
    Setting(
        "evaluate_queue_per_board",
        _positive,
        "most bitstreams an Evaluate stream may have on this worker per board it holds "
        "(queued, running or result unsent); past it the worker reads no more from the stream",
    ),
    Setting("drain_timeout", parse_seconds, "longest wait for reservations when draining"),
    Setting("reconnect_max", parse_seconds, "longest pause between reconnect attempts"),
    Setting("pid_file", str, "write the process id here (for `icefarm-worker drain`)"),
)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything `icefarm-worker run` needs; durations in seconds."""

    control: tuple[str, ...] = ("127.0.0.1:50051",)
    name: str = field(default_factory=socket.gethostname)
    listen: str = "0.0.0.0:50052"
    advertise: str = ""
    log_format: str = "console"
    log_level: str = "info"
    simulate: int = 0
    boards: str = "usb"
    gpus: str = "auto"
    # Seconds each simulated evaluation takes on the board (`--simulate` only).
    simulate_circuit_time: float = 0.0
    # The directory of a simulator running as its own process ("": none).
    simulate_root: str = ""
    flash_timeout: float = 30.0
    test_timeout: float = 10.0
    ready_timeout: float = 10.0
    evaluate_timeout: float = 10.0
    # Twice the client library's default of 2 per board, so its boards never wait on the bound.
    evaluate_queue_per_board: int = 4
    drain_timeout: float = 900.0
    reconnect_max: float = 30.0
    pid_file: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # Mode firmware name ("default", "pulsecount", ...) → .uf2 file.
    firmware: dict[str, Path] = field(default_factory=dict)
    # The `[simulator.faults]` table, handed to the simulator as it is.
    simulator_faults: dict[str, Any] = field(default_factory=dict)
    # The `[[devices]]` tables: devices that are not USB boards.
    devices: tuple[DeviceDeclaration, ...] = ()


@dataclass(frozen=True)
class DeviceDeclaration:
    """A device that is not a USB board, declared in the config file:

        [[devices]]
        id = "gpu-box-1"
        kind = "gpu-server"
        labels = { status = "idle" }
        properties = { gpu_memory_mb = 16384 }

    It is never flashed and is AVAILABLE as soon as the worker runs."""

    device_id: str
    kind: str
    labels: dict[str, str] = field(default_factory=dict)
    properties: dict[str, float] = field(default_factory=dict)


_DEVICE_KEYS = ("id", "kind", "labels", "properties")


def _declarations(value: Any, path: str) -> tuple[DeviceDeclaration, ...]:
    """The `[[devices]]` tables; ConfigError naming the table and key."""
    if not isinstance(value, list):
        raise ConfigError(f"config file {path}: devices must be an array of tables ([[devices]])")
    found: list[DeviceDeclaration] = []
    for index, table in enumerate(value):
        where = f"config file {path}: devices[{index}]"
        try:
            declaration = _declaration(table)
        except ValueError as exc:
            raise ConfigError(f"{where}.{exc}") from None
        if any(d.device_id == declaration.device_id for d in found):
            raise ConfigError(f"{where}.id: {declaration.device_id!r} is declared twice")
        found.append(declaration)
    return tuple(found)


def _declaration(table: Any) -> DeviceDeclaration:
    """One `[[devices]]` table; ValueError("KEY: problem")."""
    if not isinstance(table, dict):
        raise ValueError("id: each entry must be a table with id and kind")
    unknown = sorted(set(table) - set(_DEVICE_KEYS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (known: {', '.join(_DEVICE_KEYS)})")
    for key in ("id", "kind"):
        if not isinstance(table.get(key), str):
            raise ValueError(f"{key}: is required (a string)")
    try:
        device_id = _name(table["id"])
    except ValueError as exc:
        raise ValueError(f"id: {exc}") from None
    kind = table["kind"]
    if not re.fullmatch(r"[\x21-\x7e]{1,64}", kind):
        raise ValueError("kind: must be 1-64 printable ASCII characters without spaces")
    labels = _declared_labels(table.get("labels", {}))
    properties = _declared_properties(table.get("properties", {}))
    return DeviceDeclaration(device_id, kind, labels, properties)


def _declared_labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError('labels: must be a table (labels = { key = "value" })')
    for key, text in value.items():
        problem = key_problem(key)
        if problem is None and not isinstance(text, str):
            problem = f"label {key}: must be a string (quote it)"
        problem = problem or value_problem(key, text)
        if problem:
            raise ValueError(f"labels.{key}: {problem}")
    return {k: v for k, v in value.items() if v != ""}


def _declared_properties(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError("properties: must be a table (properties = { key = 1.5 })")
    for key, number in value.items():
        problem = key_problem(key)
        if problem is None and (isinstance(number, bool) or not isinstance(number, int | float)):
            problem = "must be a number"
        if problem is None and not math.isfinite(number):
            problem = "must be a finite number"
        if problem:
            raise ValueError(f"properties.{key}: {problem}")
    return {k: float(v) for k, v in value.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `run` flags: --config, every setting, --label and --firmware."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML file with any of the settings below [{ENV_PREFIX}CONFIG]",
    )
    defaults = {f.name: f.default for f in dataclasses.fields(WorkerConfig)}
    for setting in SETTINGS:
        default = defaults.get(setting.name)
        if isinstance(default, tuple):
            default = ",".join(str(part) for part in default)
        elif setting.parse is parse_seconds and isinstance(default, int | float):
            default = f"{default:g}s"  # durations are seconds here, written as 30s
        text = with_default(setting.help, None if default is dataclasses.MISSING else default)
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            metavar=setting.name.split("_")[-1].upper(),
            help=f"{text} [{setting.env}]",
        )
    parser.add_argument(
        "--label",
        dest="labels",
        action="append",
        metavar="KEY=VALUE",
        help=f"a worker label (repeatable; TOML [labels]) [{ENV_PREFIX}LABELS=K=V,...]",
    )
    parser.add_argument(
        "--firmware",
        action="append",
        metavar="NAME=PATH",
        help="firmware file for a mode (default, pulsecount, varmax, ...; repeatable; "
        f"TOML [firmware]) [{ENV_PREFIX}FIRMWARE=NAME=PATH,...]",
    )


def _read_file(path: str) -> dict[str, Any]:
    try:
        values = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    known = {s.name for s in SETTINGS} | {"labels", "firmware", "simulator", "devices"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting {unknown[0]!r}")
    for table in ("labels", "firmware", "simulator"):
        if table in values and not isinstance(values[table], dict):
            raise ConfigError(f"config file {path}: {table} must be a table")
    return values


def environment_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """ICEFARM_WORKER_* variables that are no setting of the worker: each a warning naming the
    closest setting."""
    known = {s.env for s in SETTINGS} | {ENV_PREFIX + n for n in ("CONFIG", "LABELS", "FIRMWARE")}
    return unknown_variables(os.environ if environ is None else environ, ENV_PREFIX, known)


def _table(
    flag_values: list[str] | None, env_value: str | None, file_value: Any, source: str
) -> dict[str, str]:
    """A name → value table: from flags if given, else the environment, else the file."""
    try:
        if flag_values:
            merged: dict[str, str] = {}
            for item in flag_values:
                merged.update(_pairs(item))
            return merged
        if env_value is not None:
            return _pairs(env_value)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return {str(k): str(v) for k, v in dict(file_value or {}).items()}


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """Each setting from the first place that has it: flag, environment, TOML file, default."""
    environ = os.environ if environ is None else environ
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    file_values = _read_file(config_path) if config_path else {}
    simulator = file_values.get("simulator", {})
    if isinstance(simulator, dict):
        unknown = sorted(set(simulator) - {"faults", "circuit_seconds"})
        if unknown:
            raise ConfigError(f"config file {config_path}: unknown setting simulator.{unknown[0]}")
        if "circuit_seconds" in simulator and "simulate_circuit_time" not in file_values:
            file_values = {**file_values, "simulate_circuit_time": simulator["circuit_seconds"]}
    values = layered_values(SETTINGS, args, environ, file_values, config_path)
    values["labels"] = _table(
        getattr(args, "labels", None),
        environ.get(ENV_PREFIX + "LABELS"),
        file_values.get("labels"),
        "--label",
    )
    firmware = _table(
        getattr(args, "firmware", None),
        environ.get(ENV_PREFIX + "FIRMWARE"),
        file_values.get("firmware"),
        "--firmware",
    )
    values["firmware"] = {name: Path(path).expanduser() for name, path in firmware.items()}
    faults = simulator.get("faults", {}) if isinstance(simulator, dict) else {}
    if not isinstance(faults, dict):
        raise ConfigError(f"config file {config_path}: simulator.faults must be a table")
    values["simulator_faults"] = faults
    if "devices" in file_values:
        values["devices"] = _declarations(file_values["devices"], str(config_path))
    config = WorkerConfig(**values)
    check(config)
    return config


def check(config: WorkerConfig) -> None:
    """Refuse settings that cannot work together (the message names the setting)."""
    for name, path in config.firmware.items():
        if not path.is_file():
            raise ConfigError(f"firmware {name}: {path} is not a file")
    if config.simulate and config.simulate_root:
        raise ConfigError("simulate_root: use either --simulate N or --simulate-root DIR")
    if config.simulate_root and config.simulate_circuit_time:
        raise ConfigError(
            "simulate_circuit_time: with --simulate-root the simulator process sets it "
            "(serve --circuit-time SECONDS)"
        )
    if config.simulate_root and not Path(config.simulate_root).is_dir():
        raise ConfigError(f"simulate_root: {config.simulate_root} is not a directory")
    simulated = config.simulate or config.simulate_root
    if config.boards == "none" and simulated:
        raise ConfigError("boards: none drives no boards; drop --simulate/--simulate-root")
    if not simulated and config.boards == "usb" and "default" not in config.firmware:
        raise ConfigError(
            "firmware default: no default firmware configured (--firmware default=PATH, "
            "or [firmware] default = PATH in the config file; --boards none for a machine "
            "without boards)"
        )
