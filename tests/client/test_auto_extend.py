"""Automatic extension of a lease shorter than the control's warning window (found by the chaos
soak, bench/soak.py): every extension of such a lease still ends "soon", so the warning came
again at once and the client extended again, about once a second for as long as it held the
boards (122 extensions of one reservation in 2.5 minutes). It extends at the first warning, and
after that no sooner than half a lease after the previous extension."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import icefarm_client as ic
from tests.client.conftest import RunningFarm
from tests.client.processes import eventually

Clients = Callable[..., ic.Client]
LEASE = timedelta(seconds=20)
HELD = 6.0  # seconds, under half the lease: one extension at most


def test_a_short_lease_is_extended_at_the_first_warning_and_not_again_within_half_a_lease(
    farm: RunningFarm, clients: Clients
) -> None:
    alice = clients(farm.address, "alice")
    with alice.reserve(1, duration=LEASE) as farm_:
        eventually(lambda: farm_.extensions >= 1, what="the first automatic extend")
        # Counting what happens over a window needs the window to pass; fail at once on a storm.
        started = time.monotonic()
        while time.monotonic() - started < HELD:
            assert farm_.extensions <= 1, f"{farm_.extensions} extensions in {HELD} s"
            time.sleep(0.1)
        warnings = [e for e in farm_.events if e.type is ic.EventType.RESERVATION_ENDING_SOON]
        assert 1 <= len(warnings) <= 2
