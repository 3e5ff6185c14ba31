"""What the control logs of a reservation's life (issue 11): reserve, release, expiry and end
at info, each with the client id, the reservation id and the request id of the call, written
once the decision has committed. A real control process and a worker with simulated boards."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import icefarm_client as ic
from tests.client.conftest import wait_available
from tests.client.processes import Processes, eventually

Clients = Callable[..., ic.Client]


def records(path: Any) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def test_a_reservations_life_is_logged_with_who_what_and_which_call(
    procs: Processes, clients: Clients
) -> None:
    control = procs.control()
    procs.worker(control.address, 2)
    alice = clients(control.address, "alice")
    wait_available(alice, 2)
    released = alice.create_reservation(1)
    alice.release(released.id)
    expiring = alice.create_reservation(1, duration=timedelta(seconds=1))

    def about(reservation_id: str, event: str) -> list[dict[str, Any]]:
        return [
            r
            for r in records(control.log)
            if r.get("event") == event and r.get("reservation") == reservation_id
        ]

    eventually(lambda: about(expiring.id, "reservation ended"), 30, "the expiry logged")
    (reserved,) = about(released.id, "reserved")
    assert reserved["level"] == "info" and reserved["client"] == "alice"
    assert reserved["request_id"] and reserved["reserve_request"] == reserved["request_id"]
    (ended,) = about(released.id, "reservation ended")
    assert (ended["client"], ended["reason"]) == ("alice", "RELEASED")
    assert ended["request_id"] and ended["request_id"] != reserved["request_id"]
    (expired,) = about(expiring.id, "reservation ended")
    assert (expired["client"], expired["reason"]) == ("alice", "EXPIRED")
