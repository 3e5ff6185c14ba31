"""Worker settings: flags win over ICEFARM_WORKER_* variables, which win over the TOML file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from icefarm_worker.config import ConfigError, WorkerConfig, add_arguments, resolve


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def firmware(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / f"{name}.uf2" for name in ("default", "pulsecount", "other")}
    for path in paths.values():
        path.write_bytes(b"UF2")
    return paths


def test_flags_beat_the_environment_which_beats_the_file(
    tmp_path: Path, firmware: dict[str, Path]
) -> None:
    config_file = tmp_path / "worker.toml"
    config_file.write_text(
        f'name = "from-file"\nlisten = "127.0.0.1:7001"\ndrain_timeout = "5m"\n'
        f'[labels]\nroom = "b12"\n'
        f'[firmware]\ndefault = "{firmware["default"]}"\npulsecount = "{firmware["pulsecount"]}"\n'
        f'[simulator.faults]\n"sim-001" = {{ fault = "slow", delay = 0.5 }}\n'
    )
    environ = {
        "ICEFARM_WORKER_NAME": "from-env",
        "ICEFARM_WORKER_LISTEN": "127.0.0.1:7002",
        "ICEFARM_WORKER_LABELS": "room=c3,rack=2",
    }
    config = resolve(
        parse("--config", str(config_file), "--name", "from-flag", "--control", "a:1,b:2"),
        environ,
    )
    assert config.name == "from-flag"
    assert config.listen == "127.0.0.1:7002"
    assert config.drain_timeout == 300
    assert config.control == ("a:1", "b:2")
    assert config.labels == {"room": "c3", "rack": "2"}
    assert config.firmware == {"default": firmware["default"], "pulsecount": firmware["pulsecount"]}
    assert config.simulator_faults == {"sim-001": {"fault": "slow", "delay": 0.5}}


def test_firmware_flags_replace_the_file_table(firmware: dict[str, Path]) -> None:
    config = resolve(
        parse(
            "--firmware",
            f"default={firmware['default']}",
            "--firmware",
            "x=" + str(firmware["other"]),
        ),
        {},
    )
    assert config.firmware == {"default": firmware["default"], "x": firmware["other"]}


def test_real_hardware_needs_a_default_firmware() -> None:
    with pytest.raises(ConfigError, match="firmware default"):
        resolve(parse(), {})
    assert resolve(parse("--simulate", "2"), {}).simulate == 2


def test_defaults() -> None:
    config = WorkerConfig()
    assert config.control == ("127.0.0.1:50051",)
    assert config.name
    assert config.drain_timeout == 900


def test_simulated_circuit_time_from_file_environment_and_flag(tmp_path: Path) -> None:
    config_file = tmp_path / "worker.toml"
    config_file.write_text("simulate = 8\n[simulator]\ncircuit_seconds = 1.0\n")
    from_file = resolve(parse("--config", str(config_file)), {})
    assert from_file.simulate_circuit_time == 1.0
    environ = {"ICEFARM_WORKER_SIMULATE_CIRCUIT_TIME": "500ms"}
    assert resolve(parse("--config", str(config_file)), environ).simulate_circuit_time == 0.5
    flag = parse("--config", str(config_file), "--simulate-circuit-time", "2s")
    assert resolve(flag, environ).simulate_circuit_time == 2.0
    config_file.write_text("simulate = 8\n[simulator]\ncircuit_second = 1.0\n")
    with pytest.raises(ConfigError, match=r"simulator\.circuit_second"):
        resolve(parse("--config", str(config_file)), {})


def test_simulate_root_replaces_simulate(tmp_path: Path) -> None:
    config = resolve(parse("--simulate-root", str(tmp_path)), {})
    assert config.simulate_root == str(tmp_path)
    with pytest.raises(ConfigError, match="simulate_root"):
        resolve(parse("--simulate-root", str(tmp_path), "--simulate", "2"), {})
    with pytest.raises(ConfigError, match="simulate_circuit_time"):
        resolve(parse("--simulate-root", str(tmp_path), "--simulate-circuit-time", "1"), {})


def test_the_evaluate_queue_per_board_is_at_least_one_and_fits_the_clients_default() -> None:
    # The client library keeps 2 bitstreams per board in flight by default (farm.evaluate).
    assert WorkerConfig().evaluate_queue_per_board >= 2
    config = resolve(parse("--simulate", "2", "--evaluate-queue-per-board", "8"), {})
    assert config.evaluate_queue_per_board == 8
    environ = {"ICEFARM_WORKER_EVALUATE_QUEUE_PER_BOARD": "3"}
    assert resolve(parse("--simulate", "2"), environ).evaluate_queue_per_board == 3
    with pytest.raises(ConfigError, match="evaluate-queue-per-board"):
        resolve(parse("--simulate", "2", "--evaluate-queue-per-board", "0"), {})
