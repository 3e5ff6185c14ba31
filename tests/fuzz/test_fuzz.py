"""Every input answered, and answered truthfully: arbitrary and malformed messages (and raw
bytes, and odd headers) to every RPC of the three services, on real servers.

After each case: a status code the RPC may answer (never UNKNOWN, INTERNAL only as a failure),
no exception text, SQL or traceback on the wire, an INVALID_ARGUMENT that names its field, a
stream that ends when it must, and the database invariants (tests/invariants.py). The suite is
bounded in time (about 60 s in all); bench/fuzz.py runs the same cases for longer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import invariants
from tests.conftest import create_pg_database, drop_pg_database
from tests.fuzz.cases import CONTROL_RPCS, RESERVATION_RPCS, WORKER_RPCS, Rpc
from tests.fuzz.farm import ControlTarget, WorkerTarget
from tests.fuzz.run import BackgroundLoop, Target, run_cases
from tests.fuzz.verdicts import Tally

# Seconds of cases per test (the servers' start and stop come on top, about 2 s each).
CONTROL_SECONDS = 16.0
WORKER_SECONDS = 12.0
# Never reached on this project's machines within the time above; only bounds a fast one.
MAX_CASES = 3000


@pytest.fixture
def loop() -> Iterator[BackgroundLoop]:
    """One event loop for the servers and the cases, in its own thread (hypothesis draws the
    cases synchronously in this one)."""
    with BackgroundLoop() as running:
        yield running


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def fuzz_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'control.db'}"
        return
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


def fuzz(loop: BackgroundLoop, target: Target, rpcs: list[Rpc], seconds: float) -> Tally:
    tally = run_cases(loop, target, rpcs, max_cases=MAX_CASES, seconds=seconds)
    report = tally.report(f"{target.backend}: {', '.join(sorted({r.service for r in rpcs}))}")
    print(report)
    assert not tally.failures, report
    assert set(tally.cases) == {r.key for r in rpcs}, report
    found = loop.run(invariants.violations(target.database))
    assert not found, invariants.describe(found)
    return tally


def test_the_control_answers_every_input_truthfully(
    loop: BackgroundLoop, fuzz_database_url: str, request: pytest.FixtureRequest
) -> None:
    backend = "postgresql" if fuzz_database_url.startswith("postgresql") else "sqlite"
    target = loop.run(ControlTarget.start(backend, fuzz_database_url))
    try:
        fuzz(loop, target, RESERVATION_RPCS + CONTROL_RPCS, CONTROL_SECONDS)
    finally:
        loop.run(target.stop())


def test_the_worker_answers_every_input_truthfully(loop: BackgroundLoop, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'control.db'}"
    target = loop.run(WorkerTarget.start(url, tmp_path / "sim"))
    try:
        fuzz(loop, target, WORKER_RPCS, WORKER_SECONDS)
    finally:
        loop.run(target.stop())
