"""The control is killed mid-experiment and restarted on the same database and port: the
experiment goes on without losing a result or its reservation."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import icefarm_client as ic
from icefarm_worker.simulator.firmware import expected_pulse_count
from tests.client.bitstreams import bitstream
from tests.client.conftest import wait_available
from tests.client.processes import BIN, Processes, cli_env, eventually

Clients = Callable[..., ic.Client]
# Liveness timers long enough that the worker is not given up on while the control is down.
PATIENT = ("--offline-timeout", "20s", "--worker-grace", "60s")


def session_generations(database: Path, client_id: str) -> dict[str, int]:
    """instance → session generation of each session row of the client, read from SQLite."""
    with sqlite3.connect(database) as conn:
        rows = conn.execute(
            "SELECT instance, session_generation FROM client_sessions WHERE client_id = ?",
            (client_id,),
        ).fetchall()
    return {instance: generation for instance, generation in rows}


def test_killing_and_restarting_the_control_loses_no_result_and_no_reservation(
    procs: Processes, clients: Clients
) -> None:
    database = procs.root / "control.db"
    control = procs.control(database, 0, *PATIENT)
    port = int(control.address.rsplit(":", 1)[1])
    procs.worker(control.address, 3)
    alice = clients(control.address, "alice")
    wait_available(alice, 3)
    data = [bitstream(300 + i) for i in range(30)]
    results: list[ic.Result] = []
    with alice.reserve(2, mode="pulsecount") as farm:
        session = alice.aio.session
        assert session.connections == 1
        for result in farm.evaluate(data, in_flight=1):
            results.append(result)
            if len(results) == 5:
                control.kill()
                control = procs.control(database, port, *PATIENT)
        # The Session came back on its own, resuming after the last event it had seen.
        eventually(lambda: session.connections >= 2 and session.connected.is_set(), 30, "resume")
        # Under the same instance: the control sees the same Session come back.
        assert session_generations(database, "alice") == {alice.session_instance: 2}
        assert [r.id for r in alice.reservations()] == [farm.id]
        before = session.last_sequence
        farm.extend()
        eventually(
            lambda: any(e.type is ic.EventType.RESERVATION_EXTENDED for e in farm.events),
            what="an event after the restart",
        )
        assert session.last_sequence > before
        sequences = [e.sequence for e in farm.events if e.sequence]
        assert sequences == sorted(set(sequences))  # none lost twice, none out of order
    assert sorted(int(r.bitstream_id) for r in results) == list(range(30))
    assert all(r.pulse_count == expected_pulse_count(data[int(r.bitstream_id)]) for r in results)
    (ended,) = alice.reservations(include_ended=True)
    assert ended.end_reason is ic.EndReason.RELEASED


def test_watch_carries_on_across_a_control_restart_without_repeating_an_event(
    procs: Processes, clients: Clients
) -> None:
    database = procs.root / "control.db"
    control = procs.control(database, 0, *PATIENT)
    port = int(control.address.rsplit(":", 1)[1])
    procs.worker(control.address, 1)
    alice = clients(control.address, "alice")
    wait_available(alice, 1)
    out = procs.root / "watch.jsonl"
    with out.open("w") as sink:
        watch = subprocess.Popen(
            [str(BIN / "icefarm"), "watch", "--json"], stdout=sink, stderr=subprocess.PIPE,
            text=True, env=cli_env(control.address),
        )  # fmt: skip
    try:

        def lines() -> list[dict[str, object]]:
            return [json.loads(line) for line in out.read_text().splitlines() if line]

        def created() -> int:
            return sum(e["type"] == "RESERVATION_CREATED" for e in lines())

        def make_events_until(count: int) -> bool:
            # The feed starts when watch has connected: make events until it shows them.
            if created() < count:
                wait_available(alice, 1)  # the released board is flashed back first
                alice.release(alice.create_reservation(1).id)
            return created() >= count

        eventually(lambda: make_events_until(1), 30, f"an event before the restart {lines()}")
        control.kill()
        control = procs.control(database, port, *PATIENT)
        wait_available(alice, 1)
        seen = created()
        eventually(lambda: make_events_until(seen + 1), 60, "an event after the restart")
        assert watch.poll() is None  # still watching
        sequences = [int(str(e["sequence"])) for e in lines()]
        assert sequences == sorted(set(sequences))  # none repeated, in order
    finally:
        watch.kill()
        watch.wait()
