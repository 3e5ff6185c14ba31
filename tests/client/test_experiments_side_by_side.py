"""Two experiments of one user, each through its own Client: they share the user's identity
(reservations belong to the client id) but each has its own Session, so neither replaces the
other's and both keep auto-extending their leases (issue 9, defect 10)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

import icefarm_client as ic
from tests.client.conftest import BOARDS, wait_available
from tests.client.processes import Processes, eventually

Clients = Callable[..., ic.Client]
LEASE = timedelta(seconds=3)


def test_two_experiments_of_one_user_both_keep_their_leases_past_the_lease_end(
    procs: Processes, clients: Clients
) -> None:
    # Warned 2 s before a 3 s lease ends: every lease is extended about once a second.
    control = procs.control(None, 0, "--ending-soon-before", "2s")
    procs.worker(control.address, BOARDS)
    first, second = clients(control.address, "alice"), clients(control.address, "alice")
    wait_available(first, BOARDS)
    assert first.session_instance != second.session_instance

    with (
        first.reserve(1, mode="pulsecount", duration=LEASE) as one,
        second.reserve(1, mode="pulsecount", duration=LEASE) as other,
    ):
        lease_ends = [one.reservation.end_time, other.reservation.end_time]
        assert all(end is not None for end in lease_ends)
        past = max(end for end in lease_ends if end is not None) + LEASE

        def both_extended_past_their_first_lease() -> bool:
            return (
                datetime.now(UTC) > past
                and one.extensions >= 2
                and other.extensions >= 2
                and one.ended is None
                and other.ended is None
            )

        eventually(both_extended_past_their_first_lease, timeout=30, what="both leases extended")
        held = {r.id: r for r in first.reservations()}
        assert set(held) == {one.id, other.id}  # both owned by alice
        assert all(r.state is ic.ReservationState.ACTIVE for r in held.values())
        assert first.aio.session.failure is None
        assert second.aio.session.failure is None
        assert first.aio.session.connections == 1
        assert second.aio.session.connections == 1


def test_each_client_names_its_own_session_and_a_bad_name_is_refused(clients: Clients) -> None:
    first, second = clients("127.0.0.1:1", "alice"), clients("127.0.0.1:1", "alice")
    assert first.client_id == second.client_id == "alice"
    assert len(first.session_instance) == 8
    assert first.session_instance != second.session_instance
    assert first.aio.session.instance == first.session_instance
    chosen = clients("127.0.0.1:1", "alice", session_instance="notebook-1")
    assert chosen.session_instance == "notebook-1"
    with pytest.raises(ValueError, match="session_instance"):
        ic.Client("127.0.0.1:1", client_id="alice", session_instance="has space")
