"""Every exception class of the client raised through the real stack (a control process, a
worker process with simulated boards), and a board failing under an experiment."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

import icefarm_client as ic
from icefarm_worker.simulator.firmware import expected_pulse_count
from tests.client.bitstreams import bitstream
from tests.client.conftest import RunningFarm, wait_available
from tests.client.processes import Processes, eventually

Clients = Callable[..., ic.Client]


def test_control_errors_raise_their_classes(farm: RunningFarm, clients: Clients) -> None:
    alice, bob = clients(farm.address, "alice"), clients(farm.address, "bob")
    held = alice.create_reservation(1)
    with pytest.raises(ic.ReservationNotFound):
        alice.extend("no-such-reservation")
    with pytest.raises(ic.NotHolder):
        bob.release(held.id)
    with pytest.raises(ic.DeviceNotFound):
        alice.device("no-such-board")
    with pytest.raises(ic.WorkerNotFound):
        alice.drain_worker("no-such-worker")
    with pytest.raises(ic.InvalidArgument) as invalid:
        alice.create_reservation(-1)
    assert invalid.value.field == "count"
    with pytest.raises(ic.InvalidSelector) as selector:
        alice.availability("kind=>pico2-ice")
    assert selector.value.position == 4 and selector.value.field == "selector"
    with pytest.raises(ic.Unauthenticated):
        clients(farm.address, "not a valid id").create_reservation(1)
    with pytest.raises(ic.DeadlineExceeded):
        clients(farm.address, "hasty", timeout=0.000001).workers()


def test_an_unreachable_control_is_control_unavailable(clients: Clients) -> None:
    retry = ic.RetryPolicy(attempts=2, initial_backoff=0.01, max_backoff=0.02)
    client = clients("127.0.0.1:1", "alice", retry=retry)
    with pytest.raises(ic.ControlUnavailable):
        client.availability()


def test_worker_errors_raise_their_classes(farm: RunningFarm, clients: Clients) -> None:
    alice = clients(farm.address, "alice")
    held = alice.create_reservation(1, mode="pulsecount")
    device_id = held.device_ids[0]
    eventually(lambda: alice.device(device_id).state is ic.DeviceState.READY, what="READY")
    assert alice.board_info(held, device_id).mode == "pulsecount"
    with pytest.raises(ic.PermissionDenied):
        alice.board_info(dataclasses.replace(held, token="forged.token"), device_id)
    with pytest.raises(ic.DeviceFailed):  # not in usbip mode
        alice.export(held, device_id)
    alice.remove_device(device_id)
    with pytest.raises(ic.FailedPrecondition, match="removed") as removed:
        alice.reboot_device(device_id)  # the state machine forbids it: plain FailedPrecondition
    assert not isinstance(removed.value, ic.DeviceNotAvailable)
    with pytest.raises(ic.DeviceNotAvailable, match="removed"):
        alice.create_reservation(device_ids=[device_id])
    farm.worker.kill()
    with pytest.raises(ic.WorkerUnavailable):
        alice.board_info(held, device_id)


FAULTY = """
[simulator.faults]
"lab-f-sim-000" = "short-read"
"""


@pytest.fixture
def faulty_farm(procs: Processes, clients: Clients, tmp_path: Path) -> RunningFarm:
    """Three boards; lab-f-sim-000 answers every bitstream with a watchdog timeout."""
    config = tmp_path / "worker.toml"
    config.write_text(FAULTY)
    control = procs.control()
    worker = procs.worker(control.address, 3, "lab-f", "--config", str(config))
    wait_available(clients(control.address, "fixture"), 3)
    return RunningFarm(procs, control, worker)


def test_told_when_a_board_fails_and_its_work_reruns_elsewhere(
    faulty_farm: RunningFarm, clients: Clients
) -> None:
    alice = clients(faulty_farm.address, "alice")
    failed: list[ic.Event] = []
    alice.on(ic.EventType.DEVICE_FAILED, failed.append)
    data = [bitstream(200 + i) for i in range(8)]
    with alice.reserve(device_ids=["lab-f-sim-000", "lab-f-sim-001"], mode="pulsecount") as farm_:
        results = list(farm_.evaluate(data, in_flight=2))
        eventually(lambda: "lab-f-sim-000" in farm_.failed, what="the farm hears of the failure")
    assert len(results) == 8
    assert all(r.ok and r.pulse_count == expected_pulse_count(data[int(r.bitstream_id)])
               for r in results)  # fmt: skip
    assert {r.device_id for r in results} == {"lab-f-sim-001"}
    eventually(lambda: failed, what="the DeviceFailed callback")
    assert failed[0].device_id == "lab-f-sim-000" and failed[0].error


def test_evaluate_raises_device_failed_only_when_no_board_is_left(
    faulty_farm: RunningFarm, clients: Clients
) -> None:
    alice = clients(faulty_farm.address, "alice")
    with (
        alice.reserve(device_ids=["lab-f-sim-000"], mode="pulsecount") as farm_,
        pytest.raises(ic.DeviceFailed, match="no board left"),
    ):
        list(farm_.evaluate([bitstream(1), bitstream(2)]))
    assert alice.reservations() == []  # released on the way out of the block


def test_an_exception_in_the_block_still_releases(farm: RunningFarm, clients: Clients) -> None:
    alice = clients(farm.address, "alice")
    with pytest.raises(ZeroDivisionError), alice.reserve(2, wait=timedelta(seconds=10)):
        _ = 1 / 0
    assert alice.reservations() == []


def test_a_board_failing_after_the_other_workers_lane_finished_reruns_there(
    procs: Processes, clients: Clients, tmp_path: Path
) -> None:
    # The soak found it: one board on each of two workers, the healthy one's share done, the
    # other board failing — the experiment got DeviceFailed("no board left") with a working
    # board still held.
    config = tmp_path / "worker.toml"
    config.write_text('[simulator.faults]\n"lab-h-sim-000" = "no-answer"\n')
    control = procs.control()
    procs.worker(control.address, 1, "lab-g")
    procs.worker(control.address, 1, "lab-h", "--config", str(config))
    alice = clients(control.address, "alice")
    wait_available(alice, 2)
    data = [bitstream(300), bitstream(301)]
    with alice.reserve(device_ids=["lab-g-sim-000", "lab-h-sim-000"], mode="pulsecount") as farm_:
        results = list(farm_.evaluate(data, in_flight=1))
    assert sorted(r.bitstream_id for r in results) == ["0", "1"]
    assert all(r.ok and r.device_id == "lab-g-sim-000" for r in results)
    # The one that failed over counts its tries on lab-h too (a worker's count starts anew).
    first, failed_over = sorted(r.attempt for r in results)
    assert first == 1 and failed_over >= 2
