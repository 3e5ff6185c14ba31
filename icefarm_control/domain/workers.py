"""Workers: their sessions, what they report about their devices, and the commands they answer.

One `WorkerRegistry` per replica. Everything it knows lives in the database (the worker row
records which replica holds the session and its generation), so any replica can take any
worker's stream, and the timers in domain/liveness.py may run on every replica.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from icefarm.settings import format_duration
from icefarm_control.domain import events
from icefarm_control.domain.clock import Clock
from icefarm_control.domain.device_changes import (
    DeviceWrite,
    WorkerLabels,
    break_device,
    end_holds_in,
    plan_report,
    record_changes,
    store_report,
    write_planned,
    write_retrying,
)
from icefarm_control.domain.device_reports import (
    DeviceReport,
    KnownDevice,
    judge_reconnect,
    judge_update,
)
from icefarm_control.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    IllegalTransition,
    InvalidArgument,
    NotFound,
    Reason,
    Unavailable,
)
from icefarm_control.domain.events import CommandType
from icefarm_control.domain.liveness import (
    BREAKING_COMMANDS,
    finish_drains,
    take_dead_sessions_offline,
    take_devices_offline,
    worker_changed,
)
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import MAX_DRAIN_TIMEOUT, Limits, Timers
from icefarm_control.domain.states import DeviceState, EndReason, WorkerState
from icefarm_control.storage import outbox, replicas
from icefarm_control.storage import queries as q
from icefarm_control.storage import waiter_queries as waiter_q
from icefarm_control.storage import worker_queries as wq
from icefarm_control.storage.database import Database, Transaction
from icefarm_control.storage.records import DeviceRow, WorkerRow

log = structlog.get_logger(__name__)
_NAME = re.compile(r"^[\x21-\x7e]{1,128}$")


class SessionExpired(Unavailable):
    """The stream's session was replaced by a newer one or timed out: register again."""


@dataclass(frozen=True)
class Registration:
    name: str
    endpoint: str = ""
    version: str = ""
    modes: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    devices: tuple[DeviceReport, ...] = ()
    # Set when the worker registers while draining (the drain's timeout; zero: the default).
    draining: timedelta | None = None


@dataclass(frozen=True)
class Session:
    """One accepted WorkerSession: the stream keeps it and names it in every call."""

    worker: str
    generation: int
    replica: str
    # The worker's labels as registered: its devices carry them (device_changes.WorkerLabels).
    labels: Mapping[str, str] = field(default_factory=dict, compare=False)


def check_registration(registration: Registration, limits: Limits) -> None:
    if not _NAME.match(registration.name):
        raise InvalidArgument("register.name", "must be 1-128 printable ASCII characters")
    if len(registration.endpoint) > 256 or len(registration.version) > 64:
        raise InvalidArgument("register.endpoint", "endpoint ≤ 256, version ≤ 64 characters")
    limit = limits.max_devices_per_worker
    if len(registration.devices) > limit:
        raise InvalidArgument(
            "register.devices",
            f"{len(registration.devices)} devices; a worker may register at most {limit}",
        )
    seen: set[str] = set()
    for report in registration.devices:
        check_report(report, limits, field_name="register.devices")
        if report.device_id in seen:
            raise InvalidArgument("register.devices", f"device {report.device_id!r} twice")
        seen.add(report.device_id)


def check_report(report: DeviceReport, limits: Limits, field_name: str = "device_update") -> None:
    if not report.device_id or len(report.device_id) > limits.max_id_length:
        raise InvalidArgument(f"{field_name}.device_id", "must be 1-128 characters")
    if len(report.kind) > 64:
        raise InvalidArgument(f"{field_name}.kind", "must be at most 64 characters")


class WorkerRegistry:
    def __init__(
        self,
        database: Database,
        engine: ReservationEngine,
        clock: Clock,
        timers: Timers,
        limits: Limits,
        replica_id: str,
    ) -> None:
        self.db = database
        self.engine = engine
        self.clock = clock
        self.timers = timers
        self.limits = limits
        self.replica_id = replica_id
        # The sessions whose streams are open in this process (a session of this replica that
        # is not here is over, whatever the database says: its end may not have been written).
        self._live: set[tuple[str, int]] = set()

    # ------------------------------------------------------------ this replica

    async def start_replica(self) -> None:
        """Announce this replica; sessions the database shows for replicas known to be gone
        (on SQLite: every other one, since one control serves a file) end at once."""
        now = self.clock.now()
        async with self.db.write() as conn:
            await waiter_q.cancel_waiters_of_other_processes(conn, self.replica_id)
            await replicas.announce(conn, self.replica_id, now)
            dead = await take_dead_sessions_offline(conn, now, self.timers, self.replica_id)
        for session in dead:
            await take_devices_offline(self.db, session, now, self.limits)

    async def refresh_replica(self) -> None:
        """This replica is alive (run every `replica_refresh_interval`)."""
        async with self.db.write() as conn:
            await replicas.refresh(conn, self.replica_id, self.clock.now())

    # ------------------------------------------------------------ sessions

    async def register(self, registration: Registration) -> Session:
        """Accept a worker's stream: refuse a second live session under its name, take over a
        dead one, and reconcile its devices with what the database holds (ARCHITECTURE §7),
        a bounded batch of devices per transaction."""
        check_registration(registration, self.limits)
        session, previous_labels = await self._start_session(registration)
        self._live.add((session.worker, session.generation))
        try:
            carried = WorkerLabels(session.labels, previous_labels)
            await self._reconcile(session, registration.devices, carried)
            async with self.db.write() as conn:
                await self._worker_changed(conn, session.worker)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.end_session(session)
            raise
        log.info("worker registered", worker=session.worker, generation=session.generation)
        return session

    async def _start_session(self, registration: Registration) -> tuple[Session, dict[str, str]]:
        """The new session, and the worker's labels before it (its devices carry them)."""
        name = registration.name
        labels = {k: v for k, v in registration.labels.items() if v}
        now = self.clock.now()
        async with self.db.write() as conn:
            await wq.ensure_worker(conn, name, now)
            row = await wq.lock_worker(conn, name)
            assert row is not None
            if await self._session_is_live(conn, row, now):
                raise AlreadyExists(
                    f"worker {name!r} already has a live session",
                    reason=Reason.WORKER_ALREADY_CONNECTED,
                )
            deadline = await self._drain_deadline(conn, registration, row.drain_deadline, now)
            draining = deadline is not None
            generation = row.session_generation + 1
            await wq.start_session(
                conn,
                name,
                endpoint=registration.endpoint,
                version=registration.version,
                modes=registration.modes,
                labels=labels,
                state=WorkerState.DRAINING if draining else WorkerState.ONLINE,
                replica=self.replica_id,
                generation=generation,
                drain_deadline=deadline,
                now=now,
            )
            await outbox.requeue_sent_commands(conn, name)
            # Wakes the replaced stream (if any), which then finds it is no longer current.
            outbox.touch(conn, outbox.worker_topic(name))
        return Session(name, generation, self.replica_id, labels), row.labels

    async def _drain_deadline(
        self,
        conn: Transaction,
        registration: Registration,
        recorded: datetime | None,
        now: datetime,
    ) -> datetime | None:
        """The drain a new session starts with. A drain belongs to a worker process: one that
        reconnects mid-drain says so in its Register (and keeps the earlier deadline, if
        sooner); one that does not is a process that is not draining — the earlier one's drain
        finished or timed out before it exited — unless an operator's Drain is still waiting to
        be delivered to it."""
        if registration.draining is not None:
            timeout = registration.draining or self.timers.drain_timeout
            deadline = now + min(timeout, MAX_DRAIN_TIMEOUT)
            return deadline if recorded is None else min(deadline, recorded)
        commands = await wq.open_commands(conn, registration.name)
        if recorded is not None and any(c.type == CommandType.DRAIN for c in commands):
            return recorded
        return None

    async def _session_is_live(
        self, conn: Transaction, row: wq.WorkerSessionRow, now: datetime
    ) -> bool:
        """Whether the session the row records still has its stream: not offline, heard from
        within the offline timeout, and held by a replica that is alive (this one: among its
        open streams; another: its row refreshed lately)."""
        holder = row.session_replica
        if holder is None or row.state == WorkerState.OFFLINE:
            return False
        if row.last_seen_time <= now - self.timers.offline_timeout:
            return False
        if holder == self.replica_id:
            return (row.name, row.session_generation) in self._live
        return await replicas.is_live(conn, holder, now - self.timers.replica_stale_after)

    async def _reconcile(
        self, session: Session, reports: Sequence[DeviceReport], carried: WorkerLabels
    ) -> None:
        batch = self.limits.devices_per_transaction
        for start in range(0, len(reports), batch):
            chunk = reports[start : start + batch]
            step = functools.partial(
                self._reconcile_batch, session=session, reports=chunk, carried=carried
            )
            freed = await write_retrying(self.db, step)
            if freed:
                await self.engine.serve_waiters()
        # Devices it no longer reports were unplugged while it was away.
        reported = {r.device_id for r in reports}
        async with self.db.read() as conn:
            known = await wq.worker_devices(conn, session.worker)
        gone = [d.id for d in known if d.id not in reported and d.state != DeviceState.REMOVED]
        for start in range(0, len(gone), batch):
            ids = gone[start : start + batch]
            step = functools.partial(self._remove_missing, session=session, device_ids=ids)
            freed = await write_retrying(self.db, step)
            if freed:
                await self.engine.serve_waiters()

    async def _require_generation(self, conn: Transaction, session: Session) -> None:
        """Lock the worker row (orders this against a Register replacing the session) and
        check the session is still the current one."""
        row = await wq.lock_worker(conn, session.worker)
        if row is None or (row.session_generation, row.session_replica) != (
            session.generation,
            session.replica,
        ):
            raise SessionExpired(_expired(session))

    async def _reconcile_batch(
        self,
        conn: Transaction,
        session: Session,
        reports: Sequence[DeviceReport],
        carried: WorkerLabels,
    ) -> bool:
        """One transaction of a Register's reconcile; True when a device became free."""
        worker, now = session.worker, self.clock.now()
        await self._require_generation(conn, session)
        ids = [r.device_id for r in reports]
        existing = await wq.lock_devices(conn, ids)
        unanswered = await wq.open_commands(conn, worker, ids)
        prepares = _command_keys(unanswered, CommandType.PREPARE_DEVICE)
        releases = _command_keys(unanswered, CommandType.RELEASE_DEVICE)
        ends: dict[EndReason, list[str]] = defaultdict(list)
        writes: list[DeviceWrite] = []
        for report in reports:
            device = existing.get(report.device_id)
            holder = device.reservation_id if device else None
            try:
                if device is not None and device.worker != worker:
                    _check_move(device, worker)
                judgement = judge_reconnect(
                    _known(device), report, prepare_pending=(report.device_id, holder) in prepares
                )
                write = plan_report(worker, device, report, judgement.state, now, carried)
            except (FailedPrecondition, InvalidArgument) as error:
                log.warning("device not reconciled", worker=worker, error=error.message)
                continue
            if write is not None:
                writes.append(write)
            if judgement.end_hold is not None:
                ends[judgement.end_hold].append(report.device_id)
            stale = judgement.release_reservation
            if stale is not None and (report.device_id, stale) not in releases:
                payload = events.release_device(device_id=report.device_id, reservation_id=stale)
                await outbox.append_command(
                    conn,
                    worker,
                    CommandType.RELEASE_DEVICE,
                    payload,
                    now,
                    device_id=report.device_id,
                )
        freed = await record_changes(conn, await write_planned(conn, writes), now)
        return await end_holds_in(conn, self.engine, ends) or freed

    async def _remove_missing(
        self, conn: Transaction, session: Session, device_ids: Sequence[str]
    ) -> bool:
        """Devices the worker no longer reports are REMOVED; their holds end."""
        worker, now = session.worker, self.clock.now()
        await self._require_generation(conn, session)
        ends: dict[EndReason, list[str]] = defaultdict(list)
        writes: list[DeviceWrite] = []
        for device in (await wq.lock_devices(conn, device_ids)).values():
            if device.worker != worker or device.state == DeviceState.REMOVED:
                continue  # moved to another worker or removed meanwhile
            gone = DeviceReport(device.id, state=DeviceState.REMOVED)
            write = plan_report(worker, device, gone, DeviceState.REMOVED, now)
            writes.extend([write] if write else [])
            if device.reservation_id is not None:
                ends[EndReason.DEVICE_REMOVED].append(device.id)
        await record_changes(conn, await write_planned(conn, writes), now)
        return await end_holds_in(conn, self.engine, ends)

    async def end_session(self, session: Session) -> None:
        """The stream ended: the worker and its boards go OFFLINE at once (holds kept, the
        worker grace counting from now) and the name is free (unless a newer session has it),
        so no Reserve hands out a dead worker's boards and it can reconnect at once."""
        # Forgotten first: even if the end cannot be written now, this replica knows the
        # stream is gone and will not let it block the worker's next Register.
        self._live.discard((session.worker, session.generation))
        now = self.clock.now()
        async with self.db.write() as conn:
            ended = await wq.end_session(conn, session.worker, session.generation)
            if ended:
                await self._worker_changed(conn, session.worker)
        log.info("worker session ended", worker=session.worker, generation=session.generation)
        if ended:
            dead = wq.DeadSession(session.worker, session.generation)
            await take_devices_offline(self.db, dead, now, self.limits)

    async def heartbeat(self, session: Session) -> None:
        async with self.db.write() as conn:
            alive = await wq.record_heartbeat(
                conn, session.worker, session.generation, self.clock.now()
            )
        if not alive:
            raise SessionExpired(_expired(session))

    async def _require_current(self, conn: Transaction, session: Session) -> None:
        if not await wq.session_is_current(
            conn, session.worker, session.generation, session.replica
        ):
            raise SessionExpired(_expired(session))

    # ------------------------------------------------------------ device reports

    async def update_device(self, session: Session, report: DeviceReport) -> None:
        """Apply one DeviceUpdate. IllegalTransition (nothing applied) when the state table
        forbids it; a report about a hold that has since ended is ignored (see
        domain/device_reports.py). A hold the report ends ends in the same transaction."""
        check_report(report, self.limits)
        if await write_retrying(self.db, lambda conn: self._apply_update(conn, session, report)):
            await self.engine.serve_waiters()

    async def _apply_update(
        self, conn: Transaction, session: Session, report: DeviceReport
    ) -> bool:
        await self._require_current(conn, session)
        existing = await wq.lock_device(conn, report.device_id)
        if existing is not None and existing.worker != session.worker:
            _check_move(existing, session.worker)
        judgement = judge_update(_known(existing), report)
        now = self.clock.now()
        carried = WorkerLabels(session.labels)
        change = await store_report(
            conn, session.worker, existing, report, judgement.state, now, carried
        )
        freed = await record_changes(conn, [change] if change else [], now)
        ends = {judgement.end_hold: [report.device_id]} if judgement.end_hold else {}
        return await end_holds_in(conn, self.engine, ends) or freed

    # ------------------------------------------------------------ commands

    async def take_commands(self, session: Session, limit: int = 100) -> list[outbox.CommandRow]:
        """The worker's next PENDING commands, oldest first, marked SENT with a deadline.
        SessionExpired when this stream no longer holds the worker's current session."""
        async with self.db.read() as conn:
            await self._require_current(conn, session)
            if not await wq.has_pending_commands(conn, session.worker):
                return []
        now = self.clock.now()
        async with self.db.write() as conn:
            # The worker row lock orders this against a Register replacing the session.
            row = await wq.lock_worker(conn, session.worker)
            current = (session.generation, session.replica, True)
            if row is None or current != (
                row.session_generation,
                row.session_replica,
                row.state != WorkerState.OFFLINE,
            ):
                raise SessionExpired(_expired(session))
            commands = await outbox.pending_commands(conn, session.worker, limit)
            await outbox.mark_sent(
                conn, [c.id for c in commands], now, now + self.timers.command_timeout
            )
        return commands

    async def command_result(
        self, session: Session, correlation_id: str, *, ok: bool, error: str
    ) -> None:
        """Record the worker's answer to one of its own commands; a failed prepare, release or
        reboot breaks the board. An answer to another worker's command changes nothing."""
        now = self.clock.now()

        async def record(conn: Transaction) -> outbox.CommandRow | None:
            command = await outbox.complete_command(
                conn, correlation_id, worker=session.worker, ok=ok, error=error, now=now
            )
            if command is None:
                owner = await outbox.command_owner(conn, correlation_id)
                if owner is not None and owner != session.worker:
                    log.warning(
                        "result for another worker's command refused",
                        worker=session.worker,
                        owner=owner,
                        correlation_id=correlation_id,
                    )
                return None
            if not ok and command.type in BREAKING_COMMANDS and command.device_id:
                reason = f"{command.type} failed: {error or 'no reason given'}"
                await break_device(conn, command.device_id, reason, now)
            return command

        command = await write_retrying(self.db, record)
        if command is None:
            log.info("result for an unknown or finished command", worker=session.worker)
            return
        if command.type == CommandType.RELEASE_DEVICE:
            async with self.db.write() as conn:
                await finish_drains(conn, now, session.worker)

    async def reboot_device(self, device_id: str) -> DeviceRow:
        """Operator: ask the device's worker to reboot it (sent down its stream)."""
        if not device_id:
            raise InvalidArgument("device_id", "is required")
        now = self.clock.now()
        async with self.db.write() as conn:
            device = await q.get_device(conn, device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r}", reason=Reason.DEVICE_NOT_FOUND)
            if device.state == DeviceState.REMOVED:
                raise IllegalTransition(f"device {device_id} is removed: nothing to reboot")
            payload = events.reboot_device(device_id=device_id)
            await outbox.append_command(
                conn, device.worker, CommandType.REBOOT_DEVICE, payload, now, device_id=device_id
            )
        return device

    # ------------------------------------------------------------ drain

    async def drain(
        self, worker: str, timeout: timedelta | None, *, tell_worker: bool
    ) -> WorkerRow:
        """No new reservations on the worker; every holder of its devices is told; once its
        last reservation ends (or the timeout passes) it gets DrainComplete. `tell_worker`:
        the operator asked, so the worker also gets a Drain command."""
        if timeout is None or timeout <= timedelta(0):
            timeout = self.timers.drain_timeout
        if timeout > MAX_DRAIN_TIMEOUT:
            raise InvalidArgument(
                "timeout", f"must be at most {format_duration(MAX_DRAIN_TIMEOUT)}"
            )
        now = self.clock.now()
        async with self.db.write() as conn:
            row = await wq.lock_worker(conn, worker)
            if row is None:
                raise NotFound(f"no worker {worker!r}", reason=Reason.WORKER_NOT_FOUND)
            if row.state == WorkerState.OFFLINE:
                raise IllegalTransition(f"worker {worker} is offline: there is nothing to drain")
            already = row.state == WorkerState.DRAINING and row.drain_deadline is not None
            deadline = now + timeout
            if already and row.drain_deadline is not None:
                deadline = min(deadline, row.drain_deadline)
            await wq.set_draining(conn, worker, deadline)
            if not already:
                await self._tell_holders(conn, worker)
            if tell_worker:
                payload = events.drain(timeout=deadline - now)
                await outbox.append_command(conn, worker, CommandType.DRAIN, payload, now)
            changed = await self._worker_changed(conn, worker)
        log.info("worker draining", worker=worker, deadline=deadline.isoformat())
        return changed

    async def _tell_holders(self, conn: Transaction, worker: str) -> None:
        held: dict[str, list[DeviceRow]] = defaultdict(list)
        for device in await wq.worker_devices(conn, worker):
            if device.reservation_id is not None:
                held[device.holder].append(device)
        for client_id, devices in sorted(held.items()):
            payload = events.worker_draining(
                worker=worker,
                device_ids=[d.id for d in devices],
                reservation_ids=[d.reservation_id or "" for d in devices],
            )
            await outbox.append_event(
                conn,
                outbox.client_audience(client_id),
                events.EventType.WORKER_DRAINING,
                payload,
                self.clock.now(),
            )

    async def _worker_changed(self, conn: Transaction, worker: str) -> WorkerRow:
        return await worker_changed(conn, worker, self.clock.now())


def _command_keys(commands: Sequence[outbox.CommandRow], kind: CommandType) -> set[tuple[str, str]]:
    return {
        (c.device_id or "", str(c.payload.get("reservation_id", "")))
        for c in commands
        if c.type == kind
    }


def _known(device: DeviceRow | None) -> KnownDevice | None:
    if device is None:
        return None
    return KnownDevice(DeviceState(device.state), device.reservation_id, device.reset_on_release)


def _check_move(device: DeviceRow, worker: str) -> None:
    """A board may move to another worker only once its old worker let go of it."""
    gone = device.state in (DeviceState.REMOVED, DeviceState.OFFLINE)
    if not gone and device.worker_state != WorkerState.OFFLINE:
        raise FailedPrecondition(f"device {device.id} belongs to worker {device.worker}")
    log.info("device moved", device=device.id, old=device.worker, new=worker)


def _expired(session: Session) -> str:
    return f"the session of worker {session.worker!r} was replaced or timed out; register again"
