"""The worker timers on both back ends, driven by a clock the test moves (no waiting)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from icefarm_control.domain.device_reports import DeviceReport
from icefarm_control.domain.liveness import WorkerLiveness
from icefarm_control.domain.requests import check_reserve
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import Limits, Timers
from icefarm_control.domain.states import DeviceState
from icefarm_control.domain.tokens import TokenSigner
from icefarm_control.domain.workers import Registration, Session, WorkerRegistry
from icefarm_control.storage import queries as q
from icefarm_control.storage import worker_queries as wq
from icefarm_control.storage.database import Database
from icefarm_control.storage.testing import operator_feed, seed_farm

TIMERS = Timers(
    offline_timeout=timedelta(seconds=30),
    worker_grace=timedelta(minutes=5),
    command_timeout=timedelta(seconds=60),
)


class MovableClock:
    def __init__(self) -> None:
        self.moment = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.moment

    def advance(self, by: timedelta) -> None:
        self.moment += by


def free_reports(name: str, count: int) -> tuple[DeviceReport, ...]:
    return tuple(
        DeviceReport(f"{name}-{i}", kind="pico2-ice", state=DeviceState.AVAILABLE)
        for i in range(count)
    )


class Farm:
    def __init__(self, database: Database) -> None:
        self.db = database
        self.clock = MovableClock()
        self.engine = ReservationEngine(
            database, signer=TokenSigner(b"k" * 32), clock=self.clock, timers=TIMERS
        )
        self.registry = WorkerRegistry(
            database, self.engine, self.clock, TIMERS, Limits(), self.engine.replica_id
        )
        self.liveness = WorkerLiveness(database, self.engine, self.clock, TIMERS)

    async def register(self, name: str = "lab-a", boards: int = 1) -> Session:
        reports = tuple(
            DeviceReport(
                f"{name}-{i}", kind="pico2-ice", state=DeviceState.AVAILABLE, reset_on_release=True
            )
            for i in range(boards)
        )
        return await self.registry.register(Registration(name=name, devices=reports))

    async def reserve(self, client: str) -> str:
        spec = check_reserve(
            count=1,
            device_ids=(),
            selector="",
            mode="pulsecount",
            mode_args={},
            lease=timedelta(hours=1),
            wait=timedelta(0),
            request_id="",
            default_lease=timedelta(hours=1),
            limits=Limits(),
        )
        return (await self.engine.reserve(client, spec)).reservation.id

    async def device(self, device_id: str) -> tuple[str, str | None]:
        async with self.db.read() as conn:
            found = await q.get_device(conn, device_id)
        assert found is not None
        return found.state, found.reservation_id

    async def worker_state(self, name: str = "lab-a") -> str:
        async with self.db.read() as conn:
            found = await wq.get_worker(conn, name)
        assert found is not None
        return found.state

    async def commands(self, name: str = "lab-a") -> list[tuple[str, str]]:
        async with self.db.read() as conn:
            return [(c.type, c.state) for c in await wq.open_commands(conn, name)]

    async def end_reason(self, reservation_id: str) -> str | None:
        async with self.db.read() as conn:
            (row,) = await q.get_reservations(conn, [reservation_id])
        return row.end_reason


async def test_workers_seeded_without_a_session_never_go_offline(database: Database) -> None:
    await seed_farm(database, workers=1, boards_per_worker=1)
    farm = Farm(database)
    farm.clock.moment = datetime.now(UTC) + timedelta(days=1)
    assert await farm.liveness.sweep_liveness() == []
    assert await farm.worker_state("worker-0") == "ONLINE"


async def test_a_silent_worker_goes_offline_once_and_loses_its_holds_after_the_grace(
    database: Database,
) -> None:
    farm = Farm(database)
    await farm.register()
    reservation_id = await farm.reserve("alice")

    farm.clock.advance(TIMERS.offline_timeout + timedelta(seconds=1))
    assert await farm.liveness.sweep_liveness() == ["lab-a"]
    assert await farm.liveness.sweep_liveness() == []
    assert await farm.device("lab-a-0") == ("OFFLINE", reservation_id)
    assert await farm.end_reason(reservation_id) is None  # still within the grace

    farm.clock.advance(TIMERS.worker_grace)
    await farm.liveness.sweep_liveness()
    assert await farm.end_reason(reservation_id) == "WORKER_LOST"
    assert await farm.device("lab-a-0") == ("OFFLINE", None)
    operator = await operator_feed(database)
    assert "worker_changed" in [e.type for e in operator]


async def test_an_overdue_drain_ends_the_holds_and_completes_once(database: Database) -> None:
    farm = Farm(database)
    await farm.register(boards=2)
    reservation_id = await farm.reserve("alice")
    await farm.registry.drain("lab-a", timedelta(seconds=10), tell_worker=True)
    assert await farm.liveness.check_drains() == []  # alice still holds a board

    farm.clock.advance(timedelta(seconds=11))
    assert await farm.liveness.check_drains() == ["lab-a"]
    assert await farm.liveness.check_drains() == []
    assert await farm.end_reason(reservation_id) == "WORKER_LOST"
    kinds = [t for t, _ in await farm.commands()]
    assert kinds.count("drain") == 1 and kinds.count("drain_complete") == 1
    assert await farm.worker_state() == "DRAINING"


async def test_a_drain_survives_a_reconnect_of_the_draining_worker(database: Database) -> None:
    farm = Farm(database)
    session = await farm.register()
    await farm.reserve("alice")
    await farm.registry.drain("lab-a", None, tell_worker=False)
    await farm.registry.end_session(session)
    # The same process, still draining, reconnects and says so in its Register.
    again = Registration(
        name="lab-a", devices=free_reports("lab-a", 1), draining=timedelta(seconds=30)
    )
    await farm.registry.register(again)
    assert await farm.worker_state() == "DRAINING"


async def test_a_worker_restarted_after_its_drain_timed_out_is_online_again(
    database: Database,
) -> None:
    # The soak found it: SIGTERM, the drain timed out with a board still held, the process
    # exited and was started again, and its 16 free boards were refused to everyone
    # ("on a worker that is draining") until its next reconnect.
    farm = Farm(database)
    session = await farm.register(boards=2)
    await farm.reserve("alice")
    await farm.registry.drain("lab-a", timedelta(seconds=10), tell_worker=False)
    await farm.registry.end_session(session)  # the drain timed out: the process exits
    farm.clock.advance(timedelta(seconds=11))
    await farm.liveness.check_drains()
    await farm.register(boards=2)  # a new process: its Register says nothing of a drain
    assert await farm.worker_state() == "ONLINE"
    await farm.reserve("bob")  # its boards are handed out again


async def test_an_operator_drain_the_worker_has_not_taken_yet_survives_its_register(
    database: Database,
) -> None:
    farm = Farm(database)
    session = await farm.register()
    await farm.registry.drain("lab-a", None, tell_worker=True)  # the Drain command is open
    await farm.registry.end_session(session)
    await farm.register()
    assert await farm.worker_state() == "DRAINING"


async def test_commands_of_an_offline_worker_wait_for_it_instead_of_timing_out(
    database: Database,
) -> None:
    farm = Farm(database)
    session = await farm.register()
    await farm.reserve("alice")
    sent = await farm.registry.take_commands(session)
    assert [c.type for c in sent] == ["prepare_device"]

    farm.clock.advance(TIMERS.offline_timeout + timedelta(seconds=1))
    await farm.liveness.sweep_liveness()
    farm.clock.advance(TIMERS.command_timeout * 2)
    assert await farm.liveness.time_out_commands() == []
    await farm.register()  # the dead session is replaced; what was SENT goes again
    assert await farm.commands() == [("prepare_device", "PENDING")]
    assert (await farm.device("lab-a-0"))[0] == "RESERVED"


async def test_an_unanswered_command_of_a_live_worker_times_out_once(database: Database) -> None:
    farm = Farm(database)
    session = await farm.register()
    reservation_id = await farm.reserve("alice")
    await farm.registry.take_commands(session)
    farm.clock.advance(TIMERS.command_timeout + timedelta(seconds=1))
    await farm.registry.heartbeat(session)
    assert [c.type for c in await farm.liveness.time_out_commands()] == ["prepare_device"]
    assert await farm.liveness.time_out_commands() == []
    assert await farm.device("lab-a-0") == ("BROKEN", reservation_id)


async def test_a_stale_report_from_an_old_release_does_not_touch_the_new_hold(
    database: Database,
) -> None:
    farm = Farm(database)
    session = await farm.register()
    first = await farm.reserve("alice")
    await farm.registry.update_device(
        session, DeviceReport("lab-a-0", state=DeviceState.READY, reservation_id=first)
    )
    await farm.engine.release("alice", reservation_ids=[first])
    # The board is FLASHING for its reset; the worker reports the reset finishing.
    for state in (DeviceState.TESTING, DeviceState.AVAILABLE):
        await farm.registry.update_device(session, DeviceReport("lab-a-0", state=state))
    second = await farm.reserve("bob")
    # A late report about the first reservation changes nothing.
    await farm.registry.update_device(
        session, DeviceReport("lab-a-0", state=DeviceState.READY, reservation_id=first)
    )
    await farm.registry.update_device(session, DeviceReport("lab-a-0", state=DeviceState.AVAILABLE))
    assert await farm.device("lab-a-0") == ("RESERVED", second)
