"""`[[devices]]` in the worker's TOML: devices that are not USB boards, each with an id, a kind,
labels and numeric properties. A mistake is one config error naming the table and key (exit 2
from the command); `--boards none` is a machine without boards and needs no firmware."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from icefarm_worker.config import ConfigError, DeviceDeclaration, add_arguments, resolve
from tests.integration.conftest import BIN

WORKER = str(BIN / "icefarm-worker")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def from_file(tmp_path: Path, text: str, *argv: str) -> tuple[DeviceDeclaration, ...]:
    config_file = tmp_path / "worker.toml"
    config_file.write_text(text)
    return resolve(parse("--config", str(config_file), "--simulate", "1", *argv), {}).devices


def test_declared_devices_are_read_with_their_labels_and_properties(tmp_path: Path) -> None:
    devices = from_file(
        tmp_path,
        '[[devices]]\nid = "gpu-box-1"\nkind = "gpu-server"\n'
        'labels = { status = "idle", "room.b" = "12" }\n'
        "properties = { gpu_memory_mb = 16384, load = 0.25 }\n"
        '[[devices]]\nid = "scope-1"\nkind = "oscilloscope"\n',
    )
    assert devices == (
        DeviceDeclaration(
            "gpu-box-1",
            "gpu-server",
            {"status": "idle", "room.b": "12"},
            {"gpu_memory_mb": 16384.0, "load": 0.25},
        ),
        DeviceDeclaration("scope-1", "oscilloscope"),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('devices = { id = "a" }', "devices must be an array of tables ([[devices]])"),
        ('[[devices]]\nkind = "gpu"', "devices[0].id: is required (a string)"),
        ('[[devices]]\nid = "a"', "devices[0].kind: is required (a string)"),
        ('[[devices]]\nid = "a b"\nkind = "gpu"', "devices[0].id: must be 1-128 printable"),
        ('[[devices]]\nid = "a"\nkind = "gpu"\ncolour = 1', "devices[0].colour: unknown key"),
        (
            '[[devices]]\nid = "a"\nkind = "gpu"\nlabels = { status = 1 }',
            "devices[0].labels.status: label status: must be a string (quote it)",
        ),
        (
            '[[devices]]\nid = "a"\nkind = "gpu"\nlabels = { "bad key" = "x" }',
            "devices[0].labels.bad key: key 'bad key' is not a selector key",
        ),
        (
            '[[devices]]\nid = "a"\nkind = "gpu"\nproperties = { gpu_memory_mb = "16G" }',
            "devices[0].properties.gpu_memory_mb: must be a number",
        ),
        (
            '[[devices]]\nid = "a"\nkind = "gpu"\nproperties = { up = true }',
            "devices[0].properties.up: must be a number",
        ),
        (
            '[[devices]]\nid = "a"\nkind = "gpu"\nproperties = { load = inf }',
            "devices[0].properties.load: must be a finite number",
        ),
        (
            '[[devices]]\nid = "a"\nkind = "gpu"\n[[devices]]\nid = "a"\nkind = "gpu"',
            "devices[1].id: 'a' is declared twice",
        ),
    ],
)
def test_a_bad_device_table_is_a_config_error_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        from_file(tmp_path, text)
    assert str(refused.value).startswith(f"config file {tmp_path / 'worker.toml'}: {message}")


def test_a_bad_device_table_exits_2_with_one_line(tmp_path: Path) -> None:
    config_file = tmp_path / "worker.toml"
    config_file.write_text('simulate = 1\n[[devices]]\nid = "a"\nkind = "gpu"\nlabels = 3\n')
    done = subprocess.run(
        [WORKER, "run", "--config", str(config_file)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"icefarm-worker: config file {config_file}: devices[0].labels: must be a table "
        '(labels = { key = "value" })'
    ]


def test_a_machine_without_boards_needs_no_firmware() -> None:
    config = resolve(parse("--boards", "none"), {})
    assert (config.boards, config.firmware) == ("none", {})
    with pytest.raises(ConfigError, match="--boards none for a machine without boards"):
        resolve(parse(), {})


def test_boards_none_with_simulated_boards_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^boards: none drives no boards"):
        resolve(parse("--boards", "none", "--simulate", "2"), {})
