"""The reservation engine: reserve (all or nothing, fair queueing), extend, release, expire.

The engine decides; storage opens the transactions and chooses between PostgreSQL's
single-statement fast paths and the general path (storage/fast_paths.py). Reservations are
written through the ledger; the waiting line plans and serves the queue."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

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
    ReservationEnded,
)
from icefarm_control.domain.ledger import ReleaseOutcome, ReservationLedger, new_reservation_row
from icefarm_control.domain.modes import ModeCatalog
from icefarm_control.domain.requests import ReserveSpec, check_ids, check_lease
from icefarm_control.domain.selectors import parse_selector
from icefarm_control.domain.settings import Limits, Timers
from icefarm_control.domain.states import EndReason, ReservationState
from icefarm_control.domain.tokens import TokenClaims, TokenSigner
from icefarm_control.domain.waiting import NEW_REQUEST, WaitingLine
from icefarm_control.notifier import Notifier
from icefarm_control.storage import fast_paths
from icefarm_control.storage import queries as q
from icefarm_control.storage import waiter_queries as waiter_q
from icefarm_control.storage.database import Database, Transaction, log_after_commit
from icefarm_control.storage.records import ReservationRow

log = structlog.get_logger(__name__)

__all__ = ["Grant", "Page", "ReleaseOutcome", "ReservationEngine", "StillDue"]

# Re-checks, inside the ending transaction, which reservations are still due to end.
StillDue = Callable[[Transaction, list[str]], Awaitable[set[str]]]


@dataclass(frozen=True)
class Grant:
    """A reservation and the token its holder shows to the devices' workers."""

    reservation: ReservationRow
    token: str


@dataclass(frozen=True)
class Page:
    reservations: list[ReservationRow]
    next_page_token: str


class ReservationEngine:
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
    ) -> None:
        self.db = database
        self.signer = signer
        self.clock = clock
        self.timers = timers or Timers()
        self.limits = limits or Limits()
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.notifier = notifier or Notifier()
        self.modes = ModeCatalog(database)
        self.ledger = ReservationLedger(clock)
        self.queue = WaitingLine(
            database, self.ledger, clock, self.timers, self.notifier, self.replica_id
        )

    # ------------------------------------------------------------ reserve

    async def reserve(self, client_id: str, spec: ReserveSpec) -> Grant:
        """All `spec.needed` devices or none; waits in line up to `spec.wait` when short.
        A request the farm can never meet (fewer matching devices in any state) fails at once
        unless it asks to wait for new devices."""
        await self.modes.check(spec.mode)
        now = self.clock.now()
        reservation_id = uuid.uuid4().hex
        quick = await fast_paths.try_reserve(
            self.db,
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
        if quick is not None:
            log.info(
                "reserved",
                client=client_id,
                reservation=reservation_id,
                reserve_request=spec.request_id,
                devices=[d.id for d in quick],
            )
            return self.grant(new_reservation_row(reservation_id, client_id, spec, quick, now))
        async with self.db.write() as tx:
            now = self.clock.now()
            answer = await self._reserve_or_queue(tx, client_id, spec, now)
        if isinstance(answer, Grant):
            return answer
        served = await self.queue.wait(answer, now + spec.wait)
        if served is None:
            async with self.db.read() as tx:
                shortage = await self._shortage(tx, spec)
            raise NotEnoughDevices(shortage.message, waited=True, counts=shortage.counts)
        return self.grant(served)

    async def _reserve_or_queue(
        self, tx: Transaction, client_id: str, spec: ReserveSpec, now: datetime
    ) -> Grant | int:
        """The general path in one transaction: the grant, or the queue entry to wait on."""
        if spec.request_id:
            # Adopt first: taking the entry over waits for a serve of it in flight, and the
            # read after it then sees the reservation that serve committed.
            queued = await self.queue.adopt(tx, client_id, spec)
            if queued is not None:
                return queued
            earlier = await q.reservation_by_request(tx, client_id, spec.request_id)
            if earlier is not None:
                return self.grant(earlier)
        if spec.device_ids:
            known = await q.existing_device_ids(tx, spec.device_ids)
            unknown = [d for d in spec.device_ids if d not in known]
            if unknown:
                raise NotFound(f"no device {unknown[0]!r}", reason=Reason.DEVICE_NOT_FOUND)
        taken = await q.take_free_devices_fast(
            tx, selector=spec.selector, count=spec.count, device_ids=spec.device_ids
        )
        if taken is None:
            demand = Demand(NEW_REQUEST, spec.count, spec.device_ids, spec.selector)
            taken = await self.queue.allocate(tx, now, extra=demand)
        if taken is not None:
            return self.grant(await self.ledger.create(tx, client_id, spec, taken, now))
        if spec.device_ids and spec.wait <= timedelta(0):
            unusable = await q.unusable_devices(tx, spec.device_ids)
            if unusable:
                raise FailedPrecondition(f"cannot reserve: {'; '.join(unusable)}")
        shortage = await self._shortage(tx, spec)
        never = shortage.counts.get("matching", spec.needed) < spec.needed
        if spec.wait <= timedelta(0) or (never and not spec.wait_for_new_devices):
            raise shortage
        return await self.queue.enqueue(tx, client_id, spec)

    async def _shortage(self, tx: Transaction, spec: ReserveSpec) -> NotEnoughDevices:
        """The error for a request that cannot be met now, with wanted / matching / free."""
        if spec.device_ids:
            return NotEnoughDevices(
                f"not all of {', '.join(spec.device_ids)} are free",
                counts={"wanted": len(spec.device_ids)},
            )
        matching = await q.count_matching_devices(tx, spec.selector)
        free = len(await q.count_free_devices(tx, spec.selector))
        where = f" matching {spec.selector_text!r}" if spec.selector_text else ""
        if matching < spec.count:
            text = (
                f"{spec.count} device(s) wanted but the farm has only {matching}{where} "
                f"({free} free); set wait_for_new_devices to wait for devices that do not "
                "exist yet"
            )
        else:
            text = f"{spec.count} device(s) wanted, {matching}{where} in the farm, {free} free"
        return NotEnoughDevices(
            text, counts={"wanted": spec.count, "matching": matching, "free": free}
        )

    def grant(self, reservation: ReservationRow) -> Grant:
        claims = TokenClaims(
            reservation_id=reservation.id,
            client_id=reservation.client_id,
            device_ids=tuple(d.id for d in reservation.devices),
            expires=reservation.end_time,
        )
        return Grant(reservation, self.signer.sign(claims))

    async def serve_waiters(self) -> None:
        """Give free devices to the queue (called when devices become AVAILABLE)."""
        await self.queue.serve_waiters()

    async def close(self) -> None:
        await self.queue.close()

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
        if len(reservation_ids) == 1 and not (device_ids or everything):
            quick = await fast_paths.try_release(
                self.db,
                client_id=client_id,
                reservation_id=reservation_ids[0],
                reason=EndReason.RELEASED.value,
                now=self.clock.now(),
            )
            if quick is not None:
                log.info(
                    "reservation ended",
                    client=client_id,
                    reservation=reservation_ids[0],
                    reason=EndReason.RELEASED.value,
                    devices=list(quick.device_ids),
                )
                if quick.queued:
                    await self.serve_waiters()
                return ReleaseOutcome(quick.device_ids, [reservation_ids[0]])
        async with self.db.write() as tx:
            rows: dict[str, ReservationRow] = {}
            targets: dict[str, list[str]] = defaultdict(list)
            if everything:
                mine = await q.active_reservation_ids(tx, client_id=client_id)
                rows.update((r.id, r) for r in await q.get_reservations(tx, mine, lock=True))
            rows.update(
                (r.id, r) for r in await self._own_reservations(tx, client_id, reservation_ids)
            )
            for row in rows.values():
                targets[row.id].extend(row.held_device_ids)
            if device_ids:
                known = await q.existing_device_ids(tx, device_ids)
                unknown = [d for d in device_ids if d not in known]
                if unknown:
                    raise NotFound(f"no device {unknown[0]!r}", reason=Reason.DEVICE_NOT_FOUND)
                holding = await q.active_reservation_ids(tx, device_ids=device_ids)
                locked = await q.get_reservations(tx, sorted(set(holding) - set(rows)), lock=True)
                rows.update((r.id, r) for r in locked)
                by_device = {
                    d: r for r in rows.values() for d in r.held_device_ids if d in set(device_ids)
                }
                for device_id in device_ids:
                    holder = by_device.get(device_id)
                    if holder is None:
                        continue  # already free: releasing twice is not an error
                    if holder.client_id != client_id:
                        raise PermissionDenied(f"device {device_id} is held by another client")
                    targets[holder.id].append(device_id)
            outcome = await self.ledger.let_go(tx, targets, EndReason.RELEASED, rows)
            await self.queue.serve_if_queued(tx, self.clock.now())
        return outcome

    async def _own_reservations(
        self,
        tx: Transaction,
        client_id: str | None,
        reservation_ids: Sequence[str],
        *,
        ended_is_error: bool = False,
    ) -> list[ReservationRow]:
        """The named reservations, locked; each must exist and be the caller's. The active
        ones are returned; an ended one is ReservationEnded when `ended_is_error`."""
        if not reservation_ids:
            return []
        rows = {r.id: r for r in await q.get_reservations(tx, reservation_ids, lock=True)}
        for reservation_id in reservation_ids:
            row = rows.get(reservation_id)
            if row is None:
                raise NotFound(
                    f"no reservation {reservation_id}", reason=Reason.RESERVATION_NOT_FOUND
                )
            if client_id is not None and row.client_id != client_id:
                raise PermissionDenied(f"reservation {reservation_id} belongs to another client")
            if ended_is_error and row.state != ReservationState.ACTIVE:
                raise ReservationEnded(_ended_text(row))
        return [rows[r] for r in reservation_ids if rows[r].state == ReservationState.ACTIVE]

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
        async with self.db.write() as tx:
            outcome = await self.end_reservations_in(
                tx,
                device_ids=device_ids,
                reservation_ids=reservation_ids,
                client_id=client_id,
                reason=reason,
                still_due=still_due,
            )
            await self.queue.serve_if_queued(tx, self.clock.now())
        return outcome

    async def end_reservations_in(
        self,
        tx: Transaction,
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
        found = await q.get_reservations(tx, reservation_ids, lock=True)
        missing = set(reservation_ids) - {r.id for r in found}
        if missing:
            raise NotFound(
                f"no reservation {sorted(missing)[0]}", reason=Reason.RESERVATION_NOT_FOUND
            )
        rows = {r.id: r for r in found}
        if client_id:
            ids = await q.active_reservation_ids(tx, client_id=client_id)
            rows.update((r.id, r) for r in await q.get_reservations(tx, ids, lock=True))
        if device_ids:
            unknown = set(device_ids) - await q.existing_device_ids(tx, device_ids)
            if unknown:
                raise NotFound(f"no device {sorted(unknown)[0]!r}", reason=Reason.DEVICE_NOT_FOUND)
            holding = await q.active_reservation_ids(tx, device_ids=device_ids)
            locked = await q.get_reservations(tx, sorted(set(holding) - set(rows)), lock=True)
            rows.update((r.id, r) for r in locked)
        if still_due is not None:
            keep = await still_due(tx, sorted(rows))
            rows = {rid: row for rid, row in rows.items() if rid in keep}
        wanted = set(device_ids)
        for row in rows.values():
            if row.id in reservation_ids or (client_id and row.client_id == client_id):
                targets[row.id].extend(row.held_device_ids)
            else:
                # Locked above: which of the named devices it still holds is read under the lock.
                targets[row.id].extend(d for d in row.held_device_ids if d in wanted)
        return await self.ledger.let_go(tx, targets, reason, rows)

    async def expire_due(self, batch: int = 100) -> list[str]:
        """End every reservation whose lease has run out (any replica may run this)."""
        now = self.clock.now()
        async with self.db.write() as tx:
            due = await q.due_reservation_ids(tx, now, batch)
            if not due:
                return []
            rows = await q.get_reservations(tx, due, lock=True)
            outcome = await self.ledger.let_go(
                tx,
                {r.id: r.held_device_ids for r in rows},
                EndReason.EXPIRED,
                {r.id: r for r in rows},
            )
            # A reservation holding only devices lost earlier ends here too.
            for row in rows:
                if row.id not in outcome.ended_reservation_ids and not row.held_device_ids:
                    await q.end_reservation(tx, row.id, EndReason.EXPIRED.value, now)
            await self.queue.serve_if_queued(tx, now)
        return due

    async def tidy_waiters(self) -> None:
        """Withdraw queue entries whose caller vanished (past their deadline) and prune old ones."""
        now = self.clock.now()
        async with self.db.write() as tx:
            await waiter_q.cancel_expired_waiters(tx, now - timedelta(seconds=5))
            await waiter_q.prune_finished_waiters(tx, now - timedelta(hours=1))

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
        """Move lease ends to now + `lease` (never earlier). `client_id` None = operator.
        A reservation named that has ended is ReservationEnded (never a silent empty answer)."""
        lease = check_lease("duration", lease, self.timers.default_lease, self.limits)
        reservation_ids = check_ids("reservation_ids", reservation_ids, self.limits)
        device_ids = check_ids("device_ids", device_ids, self.limits)
        if not (reservation_ids or device_ids or everything or owner_filter):
            raise InvalidArgument("reservation_ids", "name reservations, or set all")
        async with self.db.write() as tx:
            now = self.clock.now()
            await self._own_reservations(tx, client_id, reservation_ids, ended_is_error=True)
            ids: set[str] = set(reservation_ids)
            if everything or owner_filter:
                ids.update(await q.active_reservation_ids(tx, client_id=client_id or owner_filter))
            if device_ids:
                known = await q.existing_device_ids(tx, device_ids)
                unknown = [d for d in device_ids if d not in known]
                if unknown:
                    raise NotFound(f"no device {unknown[0]!r}", reason=Reason.DEVICE_NOT_FOUND)
                ids.update(await q.active_reservation_ids(tx, device_ids=device_ids))
            rows = await q.get_reservations(tx, sorted(ids), lock=True)
            if client_id is not None and any(r.client_id != client_id for r in rows):
                raise PermissionDenied("a device named is held by another client")
            active = [r.id for r in rows if r.state == ReservationState.ACTIVE]
            await q.set_end_time(tx, active, now + lease)
            updated = await q.get_reservations(tx, active)
            before = {r.id: r.end_time for r in rows}
            for row in updated:
                if row.end_time != before[row.id]:
                    await reservation_log.record_extended(tx, row, now)
                    log_after_commit(
                        tx,
                        "extended",
                        client=row.client_id,
                        reservation=row.id,
                        until=row.end_time.isoformat(),
                    )
        return [self.grant(r) for r in updated]

    async def list_reservations(
        self, client_id: str | None, *, include_ended: bool, page_size: int, page_token: str
    ) -> Page:
        size = paging.page_size(page_size, self.limits)
        before = paging.decode_time_token(page_token)
        async with self.db.read() as tx:
            rows = await q.list_reservations(
                tx,
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
        async with self.db.read() as tx:
            return await q.count_free_devices(tx, None if selector.is_empty else selector)


def _ended_text(row: ReservationRow) -> str:
    when = row.ended_time.isoformat(timespec="seconds") if row.ended_time else "an unknown time"
    return f"reservation {row.id} ended at {when} ({row.end_reason or 'ENDED'})"
