"""The reservation engine: reserve (all or nothing, fair queueing), extend, release, expire."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.domain import paging, reservation_log
from icefarm_control.domain.allocation import Demand
from icefarm_control.domain.clock import Clock
from icefarm_control.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotEnoughDevices,
    NotFound,
    PermissionDenied,
    Reason,
)
from icefarm_control.domain.modes import ModeCatalog
from icefarm_control.domain.requests import ReserveSpec, check_ids, check_lease
from icefarm_control.domain.selectors import parse_selector
from icefarm_control.domain.settings import DEFAULT_DB_CONCURRENCY, Limits, Timers
from icefarm_control.domain.states import (
    DeviceState,
    EndReason,
    ReservationState,
    state_after_release,
)
from icefarm_control.domain.tokens import TokenClaims, TokenSigner
from icefarm_control.domain.waiting import NEW_REQUEST, WaitingLine
from icefarm_control.notifier import Notifier
from icefarm_control.storage import fast_paths, outbox
from icefarm_control.storage import queries as q
from icefarm_control.storage import waiter_queries as waiter_q
from icefarm_control.storage.database import Database
from icefarm_control.storage.records import (
    ReservationRow,
    ReservedDeviceRow,
)
from icefarm_control.storage.sequencer import UNSEQUENCED

log = structlog.get_logger(__name__)


# Re-checks, inside the ending transaction, which reservations are still due to end.
StillDue = Callable[[AsyncConnection, list[str]], Awaitable[set[str]]]


@dataclass(frozen=True)
class Grant:
    """A reservation and the token its holder shows to the devices' workers."""

    reservation: ReservationRow
    token: str


@dataclass(frozen=True)
class ReleaseOutcome:
    device_ids: list[str]
    ended_reservation_ids: list[str]


@dataclass(frozen=True)
class Page:
    reservations: list[ReservationRow]
    next_page_token: str


class ReservationEngine(WaitingLine):
    """Every way a reservation starts, changes and ends. Safe with several replicas on one
    PostgreSQL: all coordination is in the database; in-process events only speed up wake-ups."""

    def __init__(
        self,
        database: Database,
        *,
        signer: TokenSigner,
        clock: Clock,
        timers: Timers | None = None,
        limits: Limits | None = None,
        replica_id: str = "",
        notifier: Notifier | None = None,
        concurrency: int = DEFAULT_DB_CONCURRENCY,
    ) -> None:
        self.db = database
        self.signer = signer
        self.clock = clock
        self.timers = timers or Timers()
        self.limits = limits or Limits()
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.notifier = notifier or Notifier()
        # Queue entries whose Reserve call is waiting in this process.
        self._waiting: set[int] = set()
        # Past a few statements at once, PostgreSQL on a small machine gets slower, not faster
        # (backends and WAL writers crowd the CPUs): the rest wait here, in arrival order.
        self._fast_lane = asyncio.Semaphore(concurrency)
        self.modes = ModeCatalog(database)
        self._abandoning: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ reserve

    async def reserve(self, client_id: str, spec: ReserveSpec) -> Grant:
        """All `spec.needed` devices or none; waits in line up to `spec.wait` when short."""
        await self.modes.check(spec.mode)
        if self.db.is_postgresql:
            async with self._fast_lane:
                quick = await self._reserve_in_one_statement(client_id, spec)
            if quick is not None:
                return self.grant(quick)
        now = self.clock.now()
        reservation: ReservationRow | None = None
        async with self.db.write() as conn:
            if spec.request_id:
                earlier = await q.reservation_by_request(conn, client_id, spec.request_id)
                if earlier is not None:
                    return self.grant(earlier)
            if spec.device_ids:
                known = await q.existing_device_ids(conn, spec.device_ids)
                unknown = [d for d in spec.device_ids if d not in known]
                if unknown:
                    raise InvalidArgument("device_ids", f"unknown device {unknown[0]!r}")
            taken = await q.take_free_devices_fast(
                conn, selector=spec.selector, count=spec.count, device_ids=spec.device_ids
            )
            if taken is None:
                demand = Demand(NEW_REQUEST, spec.count, spec.device_ids, spec.selector)
                taken = await self._allocate(conn, now, extra=demand)
            if taken is not None:
                reservation = await self._create(conn, client_id, spec, taken, now)
            elif spec.wait <= timedelta(0):
                if spec.device_ids:
                    unusable = await q.unusable_devices(conn, spec.device_ids)
                    if unusable:
                        raise FailedPrecondition(f"cannot reserve: {'; '.join(unusable)}")
                raise NotEnoughDevices(self._shortage(spec))
            else:
                waiter_id = await waiter_q.insert_waiter(
                    conn,
                    client_id=client_id,
                    count=spec.count,
                    device_ids=spec.device_ids,
                    selector=spec.selector_text,
                    mode=spec.mode,
                    mode_args=spec.mode_args,
                    lease_seconds=spec.lease.total_seconds(),
                    request_id=spec.request_id,
                    now=now,
                    deadline=now + spec.wait,
                    replica_id=self.replica_id,
                )
                self._waiting.add(waiter_id)
        if reservation is not None:
            return self.grant(reservation)
        return self.grant(await self._wait(waiter_id, spec, now + spec.wait))

    async def _reserve_in_one_statement(
        self, client_id: str, spec: ReserveSpec
    ) -> ReservationRow | None:
        """PostgreSQL's one-round-trip reserve; None sends the caller down the general path."""
        now = self.clock.now()
        reservation_id = uuid.uuid4().hex
        try:
            async with self.db.autocommit() as conn:
                taken = await fast_paths.reserve_in_one_statement(
                    conn,
                    reservation_id=reservation_id,
                    client_id=client_id,
                    mode=spec.mode,
                    mode_args=spec.mode_args,
                    selector_text=spec.selector_text,
                    count=spec.count,
                    device_ids=spec.device_ids,
                    now=now,
                    end_time=now + spec.lease,
                    request_id=spec.request_id,
                )
        except IntegrityError:
            return None  # a retried request_id: the general path returns the first answer
        if taken is None:
            return None
        self.db.published({UNSEQUENCED} | {outbox.worker_topic(d.worker) for d in taken})
        return self._new_row(reservation_id, client_id, spec, taken, now)

    def _shortage(self, spec: ReserveSpec) -> str:
        if spec.device_ids:
            return f"not all of {', '.join(spec.device_ids)} are free"
        where = f" matching {spec.selector_text!r}" if spec.selector_text else ""
        return f"{spec.count} device(s) wanted but fewer are free{where}"

    @staticmethod
    def _new_row(
        reservation_id: str,
        client_id: str,
        spec: ReserveSpec,
        taken: Sequence[ReservedDeviceRow],
        now: datetime,
    ) -> ReservationRow:
        return ReservationRow(
            id=reservation_id,
            client_id=client_id,
            mode=spec.mode,
            mode_args=spec.mode_args,
            selector=spec.selector_text,
            create_time=now,
            end_time=now + spec.lease,
            state=ReservationState.ACTIVE.value,
            end_reason=None,
            ended_time=None,
            request_id=spec.request_id,
            devices=tuple(sorted(taken, key=lambda d: d.id)),
        )

    async def _create(
        self,
        conn: AsyncConnection,
        client_id: str,
        spec: ReserveSpec,
        taken: Sequence[ReservedDeviceRow],
        now: datetime,
    ) -> ReservationRow:
        row = self._new_row(uuid.uuid4().hex, client_id, spec, taken, now)
        await q.insert_reservation(
            conn,
            reservation_id=row.id,
            client_id=client_id,
            mode=spec.mode,
            mode_args=spec.mode_args,
            selector=spec.selector_text,
            device_ids=[d.id for d in taken],
            now=now,
            end_time=row.end_time,
            request_id=spec.request_id,
        )
        await reservation_log.record_created(conn, row, spec.lease.total_seconds(), now)
        log.debug("reserved", reservation=row.id, client=client_id, devices=[d.id for d in taken])
        return row

    def grant(self, reservation: ReservationRow) -> Grant:
        claims = TokenClaims(
            reservation_id=reservation.id,
            client_id=reservation.client_id,
            device_ids=tuple(d.id for d in reservation.devices),
            expires=reservation.end_time,
        )
        return Grant(reservation, self.signer.sign(claims))

    # ------------------------------------------------------------ release and end

    async def release(
        self,
        client_id: str,
        *,
        device_ids: Sequence[str] = (),
        reservation_ids: Sequence[str] = (),
        everything: bool = False,
    ) -> ReleaseOutcome:
        """Stop holding devices. Devices and reservations named must be the caller's."""
        device_ids = check_ids("device_ids", device_ids, self.limits)
        reservation_ids = check_ids("reservation_ids", reservation_ids, self.limits)
        if not (device_ids or reservation_ids or everything):
            raise InvalidArgument("device_ids", "name devices or reservations, or set all")
        if self.db.is_postgresql and len(reservation_ids) == 1 and not (device_ids or everything):
            async with self._fast_lane:
                quick = await self._release_in_one_statement(client_id, reservation_ids[0])
            if quick is not None:
                return quick
        async with self.db.write() as conn:
            rows: dict[str, ReservationRow] = {}
            targets: dict[str, list[str]] = defaultdict(list)
            if everything:
                mine = await q.active_reservation_ids(conn, client_id=client_id)
                rows.update((r.id, r) for r in await q.get_reservations(conn, mine, lock=True))
            rows.update(
                (r.id, r) for r in await self._own_reservations(conn, client_id, reservation_ids)
            )
            for row in rows.values():
                targets[row.id].extend(row.held_device_ids)
            for device_id in device_ids:
                device = await q.get_device(conn, device_id)
                if device is None:
                    raise InvalidArgument("device_ids", f"unknown device {device_id!r}")
                if device.reservation_id is None:
                    continue  # already free: releasing twice is not an error
                if device.holder != client_id:
                    raise PermissionDenied(f"device {device_id} is held by another client")
                targets[device.reservation_id].append(device_id)
            outcome = await self._let_go(conn, targets, EndReason.RELEASED, rows)
            await self._serve_if_queued(conn, self.clock.now())
        return outcome

    async def _release_in_one_statement(
        self, client_id: str, reservation_id: str
    ) -> ReleaseOutcome | None:
        """PostgreSQL's one-round-trip release of a whole reservation; None = general path."""
        async with self.db.autocommit() as conn:
            released = await fast_paths.release_in_one_statement(
                conn,
                client_id=client_id,
                reservation_id=reservation_id,
                reason=EndReason.RELEASED.value,
                now=self.clock.now(),
            )
        if released is None:
            return None
        topics = {outbox.client_audience(client_id), UNSEQUENCED, outbox.DEVICES}
        self.db.published(topics | {outbox.worker_topic(w) for w in released.workers})
        if released.queued:
            await self.serve_waiters()
        return ReleaseOutcome(released.device_ids, [reservation_id])

    async def _own_reservations(
        self, conn: AsyncConnection, client_id: str, reservation_ids: Sequence[str]
    ) -> list[ReservationRow]:
        if not reservation_ids:
            return []
        rows = {r.id: r for r in await q.get_reservations(conn, reservation_ids, lock=True)}
        for reservation_id in reservation_ids:
            row = rows.get(reservation_id)
            if row is None:
                raise NotFound(
                    f"no reservation {reservation_id}", reason=Reason.RESERVATION_NOT_FOUND
                )
            if row.client_id != client_id:
                raise PermissionDenied(f"reservation {reservation_id} belongs to another client")
        return [rows[r] for r in reservation_ids if rows[r].state == ReservationState.ACTIVE]

    async def _let_go(
        self,
        conn: AsyncConnection,
        targets: dict[str, list[str]],
        reason: EndReason,
        loaded: dict[str, ReservationRow] | None = None,
    ) -> ReleaseOutcome:
        """Release the given devices of each reservation; end the ones left holding nothing.
        `loaded` are rows this transaction already read and locked."""
        now = self.clock.now()
        released: list[str] = []
        ended: list[str] = []
        rows = dict(loaded or {})
        missing = sorted(set(targets) - set(rows))
        rows.update((r.id, r) for r in await q.get_reservations(conn, missing, lock=True))
        for row in (rows[r] for r in sorted(targets) if r in rows):
            if row.state != ReservationState.ACTIVE:
                continue
            held = {d.id: d for d in row.devices if d.released_reason is None}
            letting_go = [d for d in dict.fromkeys(targets[row.id]) if d in held]
            if not letting_go:
                continue
            await q.mark_devices_released(conn, row.id, letting_go, reason.value, now)
            moves: dict[DeviceState, list[str]] = defaultdict(list)
            for device_id in letting_go:
                device = held[device_id]
                current = DeviceState(device.state)
                target = state_after_release(current, reset_on_release=device.reset_on_release)
                moves[target].append(device_id)
            await q.free_devices(conn, moves, now)
            released.extend(letting_go)
            closed = len(letting_go) == len(held)
            if closed:
                await q.end_reservation(conn, row.id, reason.value, now)
                ended.append(row.id)
                log.debug("reservation ended", reservation=row.id, reason=reason.value)
            letting_go_rows = [held[d] for d in letting_go]
            await reservation_log.record_release(conn, row, letting_go_rows, reason, closed, now)
        return ReleaseOutcome(released, ended)

    async def end_reservations(
        self,
        *,
        device_ids: Sequence[str] = (),
        reservation_ids: Sequence[str] = (),
        client_id: str = "",
        reason: EndReason = EndReason.REVOKED,
        still_due: StillDue | None = None,
    ) -> ReleaseOutcome:
        """Operator: end reservations by device, by id or by client, whoever holds them.

        `still_due`, when given, runs inside the transaction once the reservations are locked
        and returns the ids that should still end (a sweep decided on an earlier read)."""
        device_ids = check_ids("device_ids", device_ids, self.limits)
        reservation_ids = check_ids("reservation_ids", reservation_ids, self.limits)
        if not (device_ids or reservation_ids or client_id):
            raise InvalidArgument("device_ids", "name devices, reservations or a client")
        async with self.db.write() as conn:
            outcome = await self.end_reservations_in(
                conn,
                device_ids=device_ids,
                reservation_ids=reservation_ids,
                client_id=client_id,
                reason=reason,
                still_due=still_due,
            )
            await self._serve_if_queued(conn, self.clock.now())
        return outcome

    async def end_reservations_in(
        self,
        conn: AsyncConnection,
        *,
        device_ids: Sequence[str] = (),
        reservation_ids: Sequence[str] = (),
        client_id: str = "",
        reason: EndReason = EndReason.REVOKED,
        still_due: StillDue | None = None,
    ) -> ReleaseOutcome:
        """`end_reservations` inside the caller's transaction, so the decision to end and the
        ending commit together. The queue is not served here: the caller calls
        `serve_waiters()` after its commit when `device_ids` of the outcome is not empty."""
        targets: dict[str, list[str]] = defaultdict(list)
        found = await q.get_reservations(conn, reservation_ids, lock=True)
        missing = set(reservation_ids) - {r.id for r in found}
        if missing:
            raise NotFound(
                f"no reservation {sorted(missing)[0]}", reason=Reason.RESERVATION_NOT_FOUND
            )
        rows = {r.id: r for r in found}
        if client_id:
            ids = await q.active_reservation_ids(conn, client_id=client_id)
            rows.update((r.id, r) for r in await q.get_reservations(conn, ids, lock=True))
        if device_ids:
            unknown = set(device_ids) - await q.existing_device_ids(conn, device_ids)
            if unknown:
                raise NotFound(
                    f"no device {sorted(unknown)[0]!r}", reason=Reason.DEVICE_NOT_FOUND
                )
            holding = await q.active_reservation_ids(conn, device_ids=device_ids)
            rows.update(
                (r.id, r)
                for r in await q.get_reservations(conn, sorted(set(holding) - set(rows)), lock=True)
            )
        if still_due is not None:
            keep = await still_due(conn, sorted(rows))
            rows = {rid: row for rid, row in rows.items() if rid in keep}
        wanted = set(device_ids)
        for row in rows.values():
            if row.id in reservation_ids or (client_id and row.client_id == client_id):
                targets[row.id].extend(row.held_device_ids)
            else:
                # Locked above: which of the named devices it still holds is read under the lock.
                targets[row.id].extend(d for d in row.held_device_ids if d in wanted)
        return await self._let_go(conn, targets, reason, rows)

    async def expire_due(self, batch: int = 100) -> list[str]:
        """End every reservation whose lease has run out (any replica may run this)."""
        now = self.clock.now()
        async with self.db.write() as conn:
            due = await q.due_reservation_ids(conn, now, batch)
            if not due:
                return []
            rows = await q.get_reservations(conn, due, lock=True)
            outcome = await self._let_go(
                conn,
                {r.id: r.held_device_ids for r in rows},
                EndReason.EXPIRED,
                {r.id: r for r in rows},
            )
            # A reservation holding only devices lost earlier ends here too.
            for row in rows:
                if row.id not in outcome.ended_reservation_ids and not row.held_device_ids:
                    await q.end_reservation(conn, row.id, EndReason.EXPIRED.value, now)
            await self._serve_if_queued(conn, now)
        return due

    async def tidy_waiters(self) -> None:
        """Withdraw queue entries whose caller vanished (past their deadline) and prune old ones."""
        now = self.clock.now()
        async with self.db.write() as conn:
            await waiter_q.cancel_expired_waiters(conn, now - timedelta(seconds=5))
            await waiter_q.prune_finished_waiters(conn, now - timedelta(hours=1))

    # ------------------------------------------------------------ extend and list

    async def extend(
        self,
        client_id: str | None,
        *,
        reservation_ids: Sequence[str] = (),
        device_ids: Sequence[str] = (),
        everything: bool = False,
        owner_filter: str = "",
        lease: timedelta | None = None,
    ) -> list[Grant]:
        """Move lease ends to now + `lease` (never earlier). `client_id` None = operator."""
        lease = check_lease("duration", lease, self.timers.default_lease, self.limits)
        reservation_ids = check_ids("reservation_ids", reservation_ids, self.limits)
        device_ids = check_ids("device_ids", device_ids, self.limits)
        if not (reservation_ids or device_ids or everything or owner_filter):
            raise InvalidArgument("reservation_ids", "name reservations, or set all")
        now = self.clock.now()
        async with self.db.write() as conn:
            if client_id is not None:
                await self._own_reservations(conn, client_id, reservation_ids)
            else:
                found = await q.get_reservations(conn, reservation_ids)
                if len(found) != len(reservation_ids):
                    raise NotFound("no such reservation", reason=Reason.RESERVATION_NOT_FOUND)
            ids: set[str] = set(reservation_ids)
            if everything or owner_filter:
                ids.update(
                    await q.active_reservation_ids(conn, client_id=client_id or owner_filter)
                )
            if device_ids:
                ids.update(await q.active_reservation_ids(conn, device_ids=device_ids))
            rows = await q.get_reservations(conn, sorted(ids), lock=True)
            if client_id is not None and any(r.client_id != client_id for r in rows):
                raise PermissionDenied("a device named is held by another client")
            active = [r.id for r in rows if r.state == ReservationState.ACTIVE]
            await q.set_end_time(conn, active, now + lease)
            updated = await q.get_reservations(conn, active)
            before = {r.id: r.end_time for r in rows}
            for row in updated:
                if row.end_time != before[row.id]:
                    await reservation_log.record_extended(conn, row, now)
        return [self.grant(r) for r in updated]

    async def list_reservations(
        self, client_id: str | None, *, include_ended: bool, page_size: int, page_token: str
    ) -> Page:
        size = paging.page_size(page_size, self.limits)
        before = paging.decode_time_token(page_token)
        async with self.db.read() as conn:
            rows = await q.list_reservations(
                conn,
                client_id=client_id,
                include_ended=include_ended,
                limit=size + 1,
                before=before,
            )
        last = rows[size - 1] if len(rows) > size else None
        token = paging.encode_time_token(last.create_time, last.id) if last else ""
        return Page(rows[:size], token)

    async def availability(self, selector_text: str) -> list[str]:
        selector = parse_selector(selector_text)
        async with self.db.read() as conn:
            return await q.count_free_devices(conn, None if selector.is_empty else selector)
