"""Who holds what: writing a reservation and letting its devices go, inside a transaction the
caller opened. The reservation engine and the waiting line both write through it."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from icefarm_control.domain import reservation_log
from icefarm_control.domain.clock import Clock
from icefarm_control.domain.requests import ReserveSpec
from icefarm_control.domain.states import (
    DeviceState,
    EndReason,
    ReservationState,
    state_after_release,
)
from icefarm_control.storage import queries as q
from icefarm_control.storage.database import Transaction, log_after_commit
from icefarm_control.storage.records import ReservationRow, ReservedDeviceRow


@dataclass(frozen=True)
class ReleaseOutcome:
    device_ids: list[str]
    ended_reservation_ids: list[str]


def new_reservation_row(
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


class ReservationLedger:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def create(
        self,
        tx: Transaction,
        client_id: str,
        spec: ReserveSpec,
        taken: Sequence[ReservedDeviceRow],
        now: datetime,
        reservation_id: str | None = None,
    ) -> ReservationRow:
        """Record the reservation of `taken` (devices locked by this transaction)."""
        row = new_reservation_row(reservation_id or uuid.uuid4().hex, client_id, spec, taken, now)
        await q.insert_reservation(
            tx,
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
        await reservation_log.record_created(tx, row, spec.lease.total_seconds(), now)
        log_after_commit(
            tx,
            "reserved",
            client=client_id,
            reservation=row.id,
            reserve_request=spec.request_id,
            devices=[d.id for d in taken],
        )
        return row

    async def let_go(
        self,
        tx: Transaction,
        targets: dict[str, list[str]],
        reason: EndReason,
        loaded: dict[str, ReservationRow] | None = None,
    ) -> ReleaseOutcome:
        """Release the given devices of each reservation; end the ones left holding nothing.
        `loaded` are rows this transaction already read and locked; the others are locked
        here, and what each still holds is read under that lock."""
        now = self.clock.now()
        released: list[str] = []
        ended: list[str] = []
        rows = dict(loaded or {})
        missing = sorted(set(targets) - set(rows))
        rows.update((r.id, r) for r in await q.get_reservations(tx, missing, lock=True))
        for row in (rows[r] for r in sorted(targets) if r in rows):
            if row.state != ReservationState.ACTIVE:
                continue
            held = {d.id: d for d in row.devices if d.released_reason is None}
            letting_go = [d for d in dict.fromkeys(targets[row.id]) if d in held]
            if not letting_go:
                continue
            await q.mark_devices_released(tx, row.id, letting_go, reason.value, now)
            moves: dict[DeviceState, list[str]] = defaultdict(list)
            for device_id in letting_go:
                device = held[device_id]
                current = DeviceState(device.state)
                target = state_after_release(current, reset_on_release=device.reset_on_release)
                moves[target].append(device_id)
            await q.free_devices(tx, moves, now)
            released.extend(letting_go)
            closed = len(letting_go) == len(held)
            if closed:
                await q.end_reservation(tx, row.id, reason.value, now)
                ended.append(row.id)
                log_after_commit(
                    tx,
                    "reservation ended",
                    client=row.client_id,
                    reservation=row.id,
                    reason=reason.value,
                    devices=letting_go,
                )
            else:
                log_after_commit(
                    tx,
                    "devices released",
                    client=row.client_id,
                    reservation=row.id,
                    reason=reason.value,
                    devices=letting_go,
                )
            letting_go_rows = [held[d] for d in letting_go]
            await reservation_log.record_release(tx, row, letting_go_rows, reason, closed, now)
        return ReleaseOutcome(released, ended)
