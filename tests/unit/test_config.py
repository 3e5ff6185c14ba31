"""Control configuration: durations; each setting from flag, then env, then TOML, then default."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pytest

from icefarm.settings import format_duration
from icefarm_control.cli import build_parser
from icefarm_control.config import SETTINGS, ConfigError, ControlConfig, parse_duration, resolve
from icefarm_control.domain.settings import Timers


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "control.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90", timedelta(seconds=90)),
        ("90s", timedelta(seconds=90)),
        ("1500ms", timedelta(milliseconds=1500)),
        ("5m", timedelta(minutes=5)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1.5h", timedelta(minutes=90)),
        ("0", timedelta(0)),
        (" 30 s ", timedelta(seconds=30)),
    ],
)
def test_parse_duration_accepts_numbers_with_an_optional_unit(
    text: str, expected: timedelta
) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "banana", "-5s", "5x", "5 minutes", "s", "1h30m", "1e3"])
def test_parse_duration_refuses_anything_else_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_defaults_apply_when_nothing_is_set() -> None:
    config = resolve(serve_args(), environ={})
    assert config == ControlConfig(database=config.database)
    assert config.listen == "127.0.0.1:50051"
    assert config.timers == Timers()
    assert config.shutdown_grace == timedelta(seconds=10)


def test_a_flag_beats_the_environment_and_the_file(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'listen = "127.0.0.1:1"\ndefault_lease = "1h"\n')
    config = resolve(
        serve_args("--config", str(toml), "--listen", "127.0.0.1:3", "--default-lease", "3m"),
        environ={"ICEFARM_LISTEN": "127.0.0.1:2", "ICEFARM_DEFAULT_LEASE": "2m"},
    )
    assert config.listen == "127.0.0.1:3"
    assert config.default_lease == timedelta(minutes=3)


def test_the_environment_beats_the_file(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'listen = "127.0.0.1:1"\ndefault_lease = "1h"\n')
    config = resolve(
        serve_args("--config", str(toml)),
        environ={"ICEFARM_LISTEN": "127.0.0.1:2", "ICEFARM_DEFAULT_LEASE": "2m"},
    )
    assert config.listen == "127.0.0.1:2"
    assert config.default_lease == timedelta(minutes=2)


def test_the_file_beats_the_defaults(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'listen = "127.0.0.1:1"\ndefault_lease = "1h"\ndb_pool_size = 4\n')
    config = resolve(serve_args("--config", str(toml)), environ={})
    assert config.listen == "127.0.0.1:1"
    assert config.default_lease == timedelta(hours=1)
    assert config.db_pool_size == 4
    assert config.log_format == "console"


def test_the_file_can_be_named_by_icefarm_config(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'log_format = "json"\n')
    config = resolve(serve_args(), environ={"ICEFARM_CONFIG": str(toml)})
    assert config.log_format == "json"


def test_settings_are_resolved_independently(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'log_level = "error"\n')
    config = resolve(
        serve_args("--config", str(toml), "--listen", "127.0.0.1:3"),
        environ={"ICEFARM_CLIENT_GRACE": "0"},
    )
    assert config.listen == "127.0.0.1:3"
    assert config.client_grace == timedelta(0)
    assert config.log_level == "error"
    assert config.worker_grace == Timers().worker_grace


def test_every_setting_has_a_flag_and_an_environment_variable() -> None:
    parsed = serve_args()
    for setting in SETTINGS:
        assert hasattr(parsed, setting.name)
        assert setting.env == "ICEFARM_" + setting.name.upper()
        assert setting.name in ControlConfig.__dataclass_fields__


def test_an_unknown_key_in_the_file_is_an_error_naming_it(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'listen = "127.0.0.1:1"\nlisten_port = 5\n')
    with pytest.raises(ConfigError, match="listen_port"):
        resolve(serve_args("--config", str(toml)), environ={})


def test_a_file_that_is_not_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "listen = \n")
    with pytest.raises(ConfigError, match=r"control\.toml"):
        resolve(serve_args("--config", str(toml)), environ={})


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.toml"):
        resolve(serve_args("--config", str(tmp_path / "nowhere.toml")), environ={})


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--default-lease", "banana"], {}, "--default-lease"),
        ([], {"ICEFARM_LOG_FORMAT": "xml"}, "ICEFARM_LOG_FORMAT"),
        ([], {"ICEFARM_LOG_LEVEL": "loud"}, "ICEFARM_LOG_LEVEL"),
        (["--listen", "nowhere"], {}, "--listen"),
        (["--listen", "127.0.0.1:70000"], {}, "--listen"),
        (["--db-pool-size", "0"], {}, "--db-pool-size"),
        (["--db-pool-size", "many"], {}, "--db-pool-size"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_where_it_came_from(
    argv: list[str], environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        resolve(serve_args(*argv), environ=environ)


def test_a_bad_value_in_the_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'shutdown_grace = "soon"\n')
    with pytest.raises(ConfigError, match=r"control\.toml: shutdown_grace"):
        resolve(serve_args("--config", str(toml)), environ={})


def test_a_bad_value_that_a_flag_overrides_is_not_an_error() -> None:
    config = resolve(serve_args("--log-format", "json"), environ={"ICEFARM_LOG_FORMAT": "xml"})
    assert config.log_format == "json"


def test_a_token_key_shorter_than_16_characters_is_an_error_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="ICEFARM_TOKEN_KEY"):
        resolve(serve_args(), environ={"ICEFARM_TOKEN_KEY": "short"})


def test_an_empty_token_key_means_the_key_kept_in_the_database() -> None:
    assert resolve(serve_args("--token-key", ""), environ={}).token_key == ""
    assert resolve(serve_args("--token-key", "k" * 16), environ={}).token_key == "k" * 16


def test_a_short_offline_timeout_brings_the_heartbeat_down_with_it() -> None:
    # The soak's 6 s offline timeout with the 5 s heartbeat took live workers offline every
    # few seconds under load: one late heartbeat was enough.
    config = resolve(serve_args("--offline-timeout", "6s"), environ={})
    assert config.heartbeat_interval == timedelta(seconds=2)
    assert resolve(serve_args(), environ={}).heartbeat_interval == timedelta(seconds=5)


def test_a_heartbeat_over_half_the_offline_timeout_is_an_error_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"heartbeat_interval .*offline_timeout"):
        resolve(serve_args("--offline-timeout", "6s", "--heartbeat-interval", "5s"), environ={})
    config = resolve(
        serve_args("--offline-timeout", "6s", "--heartbeat-interval", "3s"), environ={}
    )
    assert config.heartbeat_interval == timedelta(seconds=3)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (7 * 86400, "7d"),
        (5400, "1h30m"),
        (2, "2s"),
        (1.5, "1.5s"),
        (0.25, "250ms"),
        (90061, "1d1h1m1s"),
    ],
)
def test_durations_print_as_people_write_them(seconds: float, text: str) -> None:
    assert format_duration(timedelta(seconds=seconds)) == text
