"""Notebooks span cells and kernels restart: a farm is reserved without a `with` block and
closed explicitly, and a Client of the same client id takes a reservation back after the
first Client went away without releasing it."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable

import pytest

import icefarm_client as ic
from icefarm_worker.simulator.firmware import expected_pulse_count
from tests.client.bitstreams import bitstream
from tests.client.conftest import BOARDS, RunningFarm, wait_available

Clients = Callable[..., ic.Client]


def check(results: list[ic.Result], data: dict[str, bytes]) -> None:
    assert sorted(r.bitstream_id for r in results) == sorted(data)
    for result in results:
        assert result.ok, result.error
        assert result.pulse_count == expected_pulse_count(data[result.bitstream_id])


def test_reserve_shows_its_parameters_not_options() -> None:
    for method in (ic.Client.reserve, ic.Client.create_reservation):
        parameters = inspect.signature(method).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        assert {"mode", "selector", "device_ids", "duration", "wait"} <= set(parameters)
        assert all(
            p.kind is p.KEYWORD_ONLY
            for name, p in parameters.items()
            if name != "self"
            if name != "count"
        )
    assert {"ready_timeout", "auto_extend"} <= set(inspect.signature(ic.Client.reserve).parameters)


def test_a_farm_without_a_with_block_is_held_from_open_to_close(
    farm: RunningFarm, clients: Clients
) -> None:
    alice = clients(farm.address, "alice")
    held = alice.reserve(2, mode="pulsecount")  # cell 1: nothing reserved yet
    assert not held.opened and alice.reservations() == []
    assert held.open() is held  # ... until opened
    assert held.opened and [r.id for r in alice.reservations()] == [held.id]
    assert len(held.devices) == 2
    data = {str(i): bitstream(900 + i) for i in range(6)}
    check(list(held.evaluate(data.items())), data)  # cell 2
    check(list(held.evaluate(data.items())), data)  # cell 3: still held
    held.close()  # cell 4
    assert not held.opened and alice.reservations() == []
    held.close()  # closing again does nothing
    with pytest.raises(ic.ReservationEnded):
        held.evaluate(data.items())


def test_the_first_use_opens_a_farm_and_with_still_works(
    farm: RunningFarm, clients: Clients
) -> None:
    bob = clients(farm.address, "bob")
    held = bob.reserve(1, mode="pulsecount")
    data = {"a": bitstream(1), "b": bitstream(2)}
    check(list(held.evaluate(data.items())), data)  # opened by evaluate
    assert [r.id for r in bob.reservations()] == [held.id]
    with held:  # entering an open farm keeps it; leaving releases it
        assert held.opened
    assert bob.reservations() == [] and not held.opened


def test_closing_a_farm_stops_an_evaluation_left_half_way(
    farm: RunningFarm, clients: Clients
) -> None:
    carol = clients(farm.address, "carol")
    held = carol.reserve(2, mode="pulsecount").open()
    results = held.evaluate(bitstream(100 + i) for i in range(40))
    first = next(results)  # the rest is abandoned, its iterator never closed
    assert first.ok
    held.close()
    assert carol.reservations() == []
    assert list(results) == []  # the abandoned iterator has ended with the farm


def test_a_restarted_kernel_resumes_its_reservation(farm: RunningFarm, clients: Clients) -> None:
    before = clients(farm.address, "notebook")
    held = before.reserve(2, mode="pulsecount").open()
    reservation_id = held.id
    before.close()  # the kernel went away without releasing
    with pytest.raises(RuntimeError, match="resume"):
        held.close()  # its Client is gone: say how to get the reservation back
    after = clients(farm.address, "notebook")  # the restarted kernel: same client id
    assert [r.id for r in after.reservations()] == [reservation_id]
    resumed = after.resume(reservation_id)
    assert resumed.opened and resumed.id == reservation_id
    assert {d.id for d in resumed.devices} == set(held.reservation.device_ids)
    data = {str(i): bitstream(500 + i) for i in range(8)}
    check(list(resumed.evaluate(data.items())), data)  # with a fresh worker token
    resumed.close()
    assert after.reservations() == []
    (ended,) = after.reservations(include_ended=True)
    assert ended.end_reason is ic.EndReason.RELEASED


def test_resume_says_clearly_why_it_cannot(farm: RunningFarm, clients: Clients) -> None:
    dave = clients(farm.address, "dave")
    with pytest.raises(ic.ReservationNotFound, match="no reservation no-such-id to resume"):
        dave.resume("no-such-id")
    made = dave.create_reservation(1)
    dave.release(made.id)
    with pytest.raises(ic.ReservationEnded, match=r"RELEASED.*reserve again"):
        dave.resume(made.id)
    kept = dave.create_reservation(1)
    other = clients(farm.address, "erin")
    with pytest.raises(ic.PermissionDenied, match=r"client id that made it.*'erin'"):
        other.resume(kept.id)
    assert [r.id for r in dave.reservations()] == [kept.id]  # untouched by the failed resume


async def test_the_async_farm_opens_by_await_and_resumes(farm: RunningFarm) -> None:
    async with ic.AsyncClient(farm.address, client_id="frank") as frank:
        held = await frank.reserve(1, mode="pulsecount")
        assert held.opened
        reservation_id = held.id
    async with ic.AsyncClient(farm.address, client_id="frank") as again:
        async with again.resume(reservation_id) as resumed:
            data = {"x": bitstream(42)}
            check([r async for r in resumed.evaluate(data.items())], data)
        assert await again.reservations() == []
        await resumed.close()  # closed already: nothing happens


CLOSE_WITHOUT_RELEASING = """
import sys
import icefarm_client as ic
client = ic.Client(sys.argv[1], client_id="script")
held = client.reserve(2, mode="pulsecount").open()
results = held.evaluate(bytes([i]) * 104090 for i in range(20))
next(results)
client.close()  # the farm open, an evaluation half-way, its auto-extend armed
print(held.id)
"""


def test_closing_a_client_leaves_no_task_pending(farm: RunningFarm, clients: Clients) -> None:
    script = clients(farm.address, "script")
    for _ in range(3):  # a race: seen in about 1 of 3 runs before the fix
        done = subprocess.run(
            [sys.executable, "-c", CLOSE_WITHOUT_RELEASING, farm.address],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "Task was destroyed" not in done.stderr and "Traceback" not in done.stderr
        # Still held: closing a Client releases nothing.
        assert [r.id for r in script.reservations()] == [done.stdout.strip()]
        script.release_all()
        wait_available(script, BOARDS)
