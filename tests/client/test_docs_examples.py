"""The grpcurl examples of the docs, run as written against a live farm (only the address is
the test's): the Session example printed no `devices_available` as it stood."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import icefarm_client as ic
from tests.client.conftest import RunningFarm, wait_available
from tests.client.processes import BIN

DOCS = Path(__file__).resolve().parents[2] / "docs"


def example(doc: str, containing: str) -> str:
    """The code block of `doc` that contains `containing`."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (DOCS / doc).read_text(), flags=re.S)
    (found,) = [b for b in blocks if containing in b]
    return found


def test_the_session_example_shows_the_availability_it_watches(
    farm: RunningFarm, clients: Callable[..., ic.Client]
) -> None:
    wait_available(clients(farm.address, "fixture"), 2)
    script = example("api.md", "ReservationService/Session").replace(
        "127.0.0.1:50051", farm.address
    )
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60,
        env={"PATH": f"{BIN}:/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"welcome"' in done.stdout and '"pong"' in done.stdout
    assert '"devices_available"' in done.stdout, done.stdout
