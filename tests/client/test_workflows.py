"""The iCEFARM client workflows, each through a real control process and a real worker
process with simulated boards."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from datetime import timedelta

import pytest

import icefarm_client as ic
from icefarm.limits import MAX_BITSTREAM_BYTES
from icefarm_worker.simulator.firmware import expected_pulse_count, expected_variance
from tests.client.bitstreams import bitstream
from tests.client.conftest import RunningFarm
from tests.client.processes import eventually

Clients = Callable[..., ic.Client]


def test_reserve_n_without_waiting_gets_them_at_once_or_not_enough_devices(
    farm: RunningFarm, clients: Clients
) -> None:
    alice, bob = clients(farm.address, "alice"), clients(farm.address, "bob")
    mine = alice.create_reservation(3, mode="pulsecount")
    assert len(mine.devices) == 3
    assert mine.token and mine.state is ic.ReservationState.ACTIVE
    with pytest.raises(ic.NotEnoughDevices):
        bob.create_reservation(2)
    assert [r.id for r in alice.reservations()] == [mine.id]


def test_reserve_with_waiting_is_served_when_boards_are_released(
    farm: RunningFarm, clients: Clients
) -> None:
    alice, bob = clients(farm.address, "alice"), clients(farm.address, "bob")
    held = alice.create_reservation(4)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(bob.create_reservation, 2, wait=timedelta(seconds=60))
        assert not waiting.done()
        alice.release(held.id)
        served = waiting.result(timeout=60)
    assert len(served.devices) == 2


def test_a_wait_that_runs_out_is_a_wait_timeout(farm: RunningFarm, clients: Clients) -> None:
    alice, bob = clients(farm.address, "alice"), clients(farm.address, "bob")
    bob.create_reservation(1)
    with pytest.raises(ic.WaitTimeout) as raised:
        alice.create_reservation(4, wait=timedelta(seconds=0.5))
    assert isinstance(raised.value, ic.DeadlineExceeded)
    assert (raised.value.wanted, raised.value.matching, raised.value.free) == (4, 4, 3)
    assert alice.reservations() == []


def test_more_boards_than_the_farm_has_fail_at_once_unless_waiting_for_new_ones(
    farm: RunningFarm, clients: Clients
) -> None:
    alice = clients(farm.address, "alice")
    with pytest.raises(ic.NotEnoughDevices) as raised:
        alice.create_reservation(5, wait=timedelta(minutes=5))
    assert not isinstance(raised.value, ic.WaitTimeout)
    assert (raised.value.wanted, raised.value.matching) == (5, 4)
    with pytest.raises(ic.WaitTimeout):
        alice.create_reservation(5, wait=timedelta(seconds=0.5), wait_for_new_devices=True)
    assert alice.reservations() == []


def test_reserve_specific_boards_by_id(farm: RunningFarm, clients: Clients) -> None:
    alice, bob = clients(farm.address, "alice"), clients(farm.address, "bob")
    mine = alice.create_reservation(device_ids=["lab-a-sim-001", "lab-a-sim-003"])
    assert sorted(mine.device_ids) == ["lab-a-sim-001", "lab-a-sim-003"]
    with pytest.raises(ic.NotEnoughDevices):
        bob.create_reservation(device_ids=["lab-a-sim-003"])
    bob.remove_device("lab-a-sim-000")
    with pytest.raises(ic.DeviceNotAvailable, match="lab-a-sim-000 is removed"):
        bob.create_reservation(device_ids=["lab-a-sim-000"])


def test_extend_one_then_all(farm: RunningFarm, clients: Clients) -> None:
    alice = clients(farm.address, "alice")
    first = alice.create_reservation(1, duration=timedelta(minutes=5))
    second = alice.create_reservation(1, duration=timedelta(minutes=5))
    assert first.end_time and second.end_time
    (extended,) = alice.extend(first.id, duration=timedelta(minutes=30))
    assert extended.id == first.id and extended.token
    assert extended.end_time and extended.end_time > first.end_time + timedelta(minutes=20)
    both = alice.extend_all(timedelta(hours=2))
    assert sorted(r.id for r in both) == sorted([first.id, second.id])
    assert all(r.end_time and r.end_time > first.end_time + timedelta(hours=1) for r in both)


def test_release_one_then_all(farm: RunningFarm, clients: Clients) -> None:
    alice = clients(farm.address, "alice")
    first = alice.create_reservation(1)
    second = alice.create_reservation(1)
    third = alice.create_reservation(1)
    released = alice.release(first.id)
    assert released.ended_reservation_ids == (first.id,)
    assert released.device_ids == first.device_ids
    everything = alice.release_all()
    assert sorted(everything.ended_reservation_ids) == sorted([second.id, third.id])
    assert alice.reservations() == []
    ended = alice.reservations(include_ended=True)
    assert {r.end_reason for r in ended} == {ic.EndReason.RELEASED}


def test_evaluate_in_pulsecount_mode_gives_each_bitstream_its_pulse_count(
    farm: RunningFarm, clients: Clients
) -> None:
    alice = clients(farm.address, "alice")
    items = [(f"b{i}", bitstream(i)) for i in range(12)]
    with alice.reserve(3, mode="pulsecount") as farm_:
        assert len(farm_.devices) == 3
        results = list(farm_.evaluate(items))
        reservation_id = farm_.id
    assert sorted(r.bitstream_id for r in results) == sorted(i for i, _ in items)
    data = dict(items)
    assert all(
        r.ok and r.pulse_count == expected_pulse_count(data[r.bitstream_id]) for r in results
    )
    assert {r.device_id for r in results} <= set(farm_.reservation.device_ids)
    (ended,) = alice.reservations(include_ended=True)
    assert ended.id == reservation_id and ended.state is ic.ReservationState.ENDED


def test_evaluate_in_varmax_mode_gives_each_bitstream_its_variance(
    farm: RunningFarm, clients: Clients
) -> None:
    alice = clients(farm.address, "alice")
    data = [bitstream(100 + i) for i in range(6)]
    with alice.reserve(2, mode="varmax") as farm_:
        results = list(farm_.evaluate(data))
    assert len(results) == 6
    for result in results:
        assert result.ok and result.pulse_count is None
        assert result.variance == pytest.approx(expected_variance(data[int(result.bitstream_id)]))


def test_a_bitstream_that_cannot_run_is_a_failed_result_not_an_exception(
    farm: RunningFarm, clients: Clients
) -> None:
    alice = clients(farm.address, "alice")
    with alice.reserve(1, mode="pulsecount") as farm_:
        results = {
            r.bitstream_id: r for r in farm_.evaluate([bitstream(1), b"short", bitstream(2)])
        }
    assert results["0"].ok and results["2"].ok
    assert not results["1"].ok and results["1"].value is None and results["1"].error


def test_a_bitstream_over_the_workers_limit_fails_alone(
    farm: RunningFarm, clients: Clients
) -> None:
    """A worker would end the whole stream over it; the client fails it before sending."""
    alice = clients(farm.address, "alice")
    too_big = bytes(MAX_BITSTREAM_BYTES + 1)
    with alice.reserve(1, mode="pulsecount") as farm_:
        results = {r.bitstream_id: r for r in farm_.evaluate([bitstream(1), too_big, bitstream(2)])}
    assert results["0"].ok and results["2"].ok
    assert not results["1"].ok and str(MAX_BITSTREAM_BYTES) in results["1"].error


def test_wait_until_n_boards_are_available(farm: RunningFarm, clients: Clients) -> None:
    alice, bob = clients(farm.address, "alice"), clients(farm.address, "bob")
    held = alice.create_reservation(4)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(bob.wait_available, 3, "kind=pico2-ice", timedelta(seconds=60))
        assert not waiting.done()
        alice.release(held.id)
        available = waiting.result(timeout=60)
    assert available.count >= 3 and len(available.device_ids) >= 3
    with pytest.raises(ic.WaitTimeout):
        bob.wait_available(5, timeout=timedelta(seconds=0.3))


def test_told_when_a_reservation_ends(farm: RunningFarm, clients: Clients) -> None:
    alice, operator = clients(farm.address, "alice"), clients(farm.address, "operator")
    heard: list[ic.Event] = []
    alice.on(ic.EventType.RESERVATION_ENDED, heard.append)
    with alice.reserve(2, mode="pulsecount") as farm_:
        operator.end_reservations(reservation_ids=[farm_.id])
        eventually(lambda: farm_.ended is not None, what="the farm hears the end")
        assert farm_.ended is not None and farm_.ended.reason is ic.EndReason.REVOKED
    eventually(lambda: heard, what="the callback")
    assert heard[0].reservation_id == farm_.id and heard[0].reason is ic.EndReason.REVOKED


def test_the_lease_is_extended_when_it_is_ending_soon(farm: RunningFarm, clients: Clients) -> None:
    # Leases shorter than ending_soon_before (10 min) are "ending soon" at once.
    alice = clients(farm.address, "alice")
    with alice.reserve(1, duration=timedelta(minutes=2)) as farm_:
        eventually(lambda: farm_.extensions >= 1, what="an automatic extend")
        assert any(e.type is ic.EventType.RESERVATION_ENDING_SOON for e in farm_.events)


def test_a_worker_draining_is_announced_to_holders(farm: RunningFarm, clients: Clients) -> None:
    alice, operator = clients(farm.address, "alice"), clients(farm.address, "operator")
    events = alice.events(ic.EventType.WORKER_DRAINING)
    with alice.reserve(2, mode="pulsecount") as farm_:
        worker = operator.drain_worker("lab-a", timeout=timedelta(minutes=5))
        assert worker.state is ic.WorkerState.DRAINING
        draining = next(events)
        assert draining.worker == "lab-a" and farm_.id in draining.reservation_ids
        assert all(r.ok for r in farm_.evaluate([bitstream(7)]))
        with pytest.raises(ic.NotEnoughDevices):
            operator.create_reservation(1)
    # The last reservation ended: the worker finishes its drain and exits 0.
    assert farm.worker.popen.wait(timeout=30) == 0
