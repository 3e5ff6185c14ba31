"""Selectors compiled to SQL select exactly the devices `Selector.matches` selects, on SQLite and
on PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import make_url

from icefarm_control.domain.selectors import parse_selector
from icefarm_control.storage import models
from icefarm_control.storage.database import Database
from icefarm_control.storage.migrate import upgrade
from icefarm_control.storage.selector_sql import selector_clause

POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class Device:
    id: str
    worker: str
    kind: str
    labels: Mapping[str, str] = field(default_factory=dict)
    properties: Mapping[str, float] = field(default_factory=dict)


DEVICES = [
    Device(
        "d01",
        "lab-a",
        "pico2-ice",
        {"firmware": "v1", "place": "rack 1"},
        {"mem": 16384, "temp": 41.5},
    ),
    Device("d02", "lab-a", "pico2-ice", {"firmware": "old"}, {"mem": 8192}),
    Device("d03", "lab-a", "pico-ice", {"firmware": "v2", "broken_before": "2024-01-01"}),
    Device("d04", "lab-b", "pico2-ice", {}, {"mem": 32768, "temp": -5}),
    Device("d05", "lab-b", "ice40-hx8k", {"version": "5"}),
    Device("d06", "lab-b", "pico-ice", {}, {"version": 5}),
    Device("d07", "lab-b", "pico-ice", {}, {"version": 5.5}),
    Device("d08", "lab-a", "pico2-ice", {"a.b/c-d": "x y,z"}),
    Device("d09", "lab-a", "ice40-up5k", {"firmware": "v1"}, {"temp": 0}),
    Device("d10", "lab-b", "pico2-ice", {"note": 'say "hi"\\'}, {"ratio": 0.1}),
    Device("d11", "lab-a", "pico-ice", {"firmware": "v10"}, {"mem": 16384.0}),
    Device("d12", "lab-b", "pico2-ice", {"kind": "fake", "x": "1"}, {"x": 2}),
]
ALL = {d.id for d in DEVICES}
HOSTILE = 'note="\'; DROP TABLE devices; --", firmware notin ("\' OR 1=1 --")'

# Hand-computed answers, so the test fails even if Python and SQL agree on something wrong.
EXPECTED: dict[str, set[str]] = {
    "": ALL,
    "kind=pico2-ice": {"d01", "d02", "d04", "d08", "d10", "d12"},
    "kind=fake": set(),
    "kind!=pico2-ice": {"d03", "d05", "d06", "d07", "d09", "d11"},
    "worker in (lab-a)": {"d01", "d02", "d03", "d08", "d09", "d11"},
    "worker notin (lab-a, lab-b)": set(),
    "id in (d01, d03, nope)": {"d01", "d03"},
    "firmware=v1": {"d01", "d09"},
    "firmware!=v1": ALL - {"d01", "d09"},
    "firmware in (v1, v2)": {"d01", "d03", "d09"},
    "firmware notin (v1, old)": ALL - {"d01", "d02", "d09"},
    "firmware": {"d01", "d02", "d03", "d09", "d11"},
    "!firmware": {"d04", "d05", "d06", "d07", "d08", "d10", "d12"},
    "mem>=16384": {"d01", "d04", "d11"},
    "mem<16384": {"d02"},
    "mem>8192, mem<=16384": {"d01", "d11"},
    "mem>1e4": {"d01", "d04", "d11"},
    "temp<0": {"d04"},
    "temp>=0": {"d01", "d09"},
    "version=5": {"d05", "d06"},
    "version=5.0": {"d06"},
    "version!=5": ALL - {"d05", "d06"},
    "version in (5.5, x)": {"d07"},
    "version notin (5, 5.5)": ALL - {"d05", "d06", "d07"},
    "version>5": {"d07"},
    "version": {"d05", "d06", "d07"},
    'a.b/c-d="x y,z"': {"d08"},
    r'note="say \"hi\"\\"': {"d10"},
    "ratio=0.1": {"d10"},
    "x=1": {"d12"},
    "x=2": {"d12"},
    "x!=1": ALL - {"d12"},
    "kind in (pico-ice, ice40-hx8k), !broken_before": {"d05", "d06", "d07", "d11"},
    "!mem, !firmware, worker=lab-b": {"d05", "d06", "d07", "d10", "d12"},
    "missing!=a": ALL,
    "missing<5": set(),
    "!missing": ALL,
    HOSTILE: set(),
}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A fresh, migrated database on each back end, dropped afterwards."""
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path}/x.db")
        await upgrade(db)
        yield db
        await db.dispose()
        return
    name = f"icefarm_test_{uuid.uuid4().hex}"
    try:
        admin = await psycopg.AsyncConnection.connect(
            POSTGRES_SERVER, autocommit=True, connect_timeout=5
        )
    except psycopg.OperationalError as error:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is unreachable: {error}")
        pytest.skip(f"PostgreSQL is unreachable: {error}")
    async with admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
        db = Database(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
        try:
            await upgrade(db)
            yield db
        finally:
            await db.dispose()
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
async def seeded(database: Database) -> Database:
    now = datetime.now(UTC)
    async with database.write() as conn:
        await conn.execute(
            insert(models.workers),
            [{"name": w, "state": "online", "last_seen_time": now} for w in ("lab-a", "lab-b")],
        )
        await conn.execute(
            insert(models.devices),
            [
                {
                    "id": d.id,
                    "worker_name": d.worker,
                    "kind": d.kind,
                    "labels": dict(d.labels),
                    "properties": dict(d.properties),
                    "state": "AVAILABLE",
                    "state_time": now,
                }
                for d in DEVICES
            ],
        )
    return database


async def selected_ids(database: Database, text: str) -> set[str]:
    query = select(models.devices.c.id).where(selector_clause(parse_selector(text)))
    async with database.read() as conn:
        return set((await conn.execute(query)).scalars())


async def test_sql_selects_the_hand_computed_devices(seeded: Database) -> None:
    wrong = {}
    for text, expected in EXPECTED.items():
        if (got := await selected_ids(seeded, text)) != expected:
            wrong[text] = (sorted(got), sorted(expected))

    assert wrong == {}


async def test_sql_agrees_with_python_matching(seeded: Database) -> None:
    disagreements = {}
    for text in EXPECTED:
        selector = parse_selector(text)
        in_python = {d.id for d in DEVICES if selector.matches(d)}
        if (in_sql := await selected_ids(seeded, text)) != in_python:
            disagreements[text] = (sorted(in_sql), sorted(in_python))

    assert disagreements == {}


def test_python_matching_gives_the_hand_computed_devices() -> None:
    wrong = {}
    for text, expected in EXPECTED.items():
        selector = parse_selector(text)
        if (got := {d.id for d in DEVICES if selector.matches(d)}) != expected:
            wrong[text] = (sorted(got), sorted(expected))

    assert wrong == {}


async def test_hostile_values_leave_the_table_intact(seeded: Database) -> None:
    await selected_ids(seeded, HOSTILE)

    async with seeded.read() as conn:
        count = (await conn.execute(select(func.count()).select_from(models.devices))).scalar()
    assert count == len(DEVICES)


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "postgresql+psycopg://"])
def test_keys_and_values_are_bound_parameters(url: str) -> None:
    selector = parse_selector('secret_key="secret value", other in (v1, v2), n>=42')
    query = select(models.devices.c.id).where(selector_clause(selector))

    sql = str(query.compile(dialect=make_url(url).get_dialect()()))

    for literal in ("secret_key", "secret value", "other", "v1", "42"):
        assert literal not in sql
