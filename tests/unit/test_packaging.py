"""Packaging as a newcomer meets it (issue 11): a distribution name that is not the original
project's, a plain install that is the client and CLI only, a light `import icefarm_client`,
and `--version` everywhere."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import icefarm
import icefarm_client

REPOSITORY = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# What only the control or the worker needs (grpc_health and grpc_reflection are left out:
# `import grpc` imports them itself when they are installed, as they are here).
HEAVY = ("sqlalchemy", "alembic", "psycopg", "aiosqlite", "cryptography", "pyudev", "serial",
         "starlette", "jinja2", "uvicorn", "platformdirs")  # fmt: skip


def project() -> dict[str, object]:
    with (REPOSITORY / "pyproject.toml").open("rb") as source:
        found: dict[str, object] = tomllib.load(source)["project"]
        return found


def requirement_names(requirements: object) -> set[str]:
    assert isinstance(requirements, list)
    return {re.split(r"[\[=<>!~ ]", str(r), maxsplit=1)[0].lower() for r in requirements}


def test_the_distribution_is_not_the_original_projects_name() -> None:
    # `icefarm` on the package index is the original Flask project: `pip install -U icefarm`
    # would replace ours with it.
    assert project()["name"] == icefarm.DISTRIBUTION == "icefarm-grpc"


def test_the_plain_install_is_the_client_and_the_extras_the_control_and_the_worker() -> None:
    found = project()
    plain = requirement_names(found["dependencies"])
    assert plain == {"grpcio", "grpcio-status", "protobuf", "structlog", "tenacity"}
    extras = found["optional-dependencies"]
    assert isinstance(extras, dict)
    assert {"sqlalchemy", "alembic", "psycopg", "cryptography"} <= requirement_names(
        extras["control"]
    )
    assert {"pyserial", "pyudev", "cryptography"} <= requirement_names(extras["worker"])
    assert extras["all"] == ["icefarm-grpc[control,worker]"]


def test_importing_the_client_loads_nothing_of_the_control_or_the_worker() -> None:
    probe = "import icefarm_client, json, sys; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout)  # fmt: skip
    heavy = sorted({m for m in loaded if m.split(".")[0] in HEAVY})
    assert heavy == []
    assert not any(m.startswith(("icefarm_control", "icefarm_worker")) for m in loaded)


def test_every_command_and_the_library_tell_their_version() -> None:
    assert icefarm_client.__version__ == icefarm.__version__ == project()["version"]
    for command in ("icefarm", "icefarm-control", "icefarm-worker"):
        answer = subprocess.run(
            [str(BIN / command), "--version"], capture_output=True, text=True, timeout=60
        )
        assert (answer.returncode, answer.stdout.strip()) == (
            0,
            f"{command} {project()['version']}",
        )
