"""The operator half of ControlService, and the holder's calls to a worker's WorkerService."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import structlog

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm_client import convert
from icefarm_client.calls import CallBase
from icefarm_client.errors import ControlUnavailable, DeviceNotFound, IcefarmError, translate
from icefarm_client.models import (
    BoardInfo,
    Device,
    DeviceState,
    Event,
    ExportInfo,
    Released,
    Reservation,
    Worker,
)

PAGE_SIZE = 500


log = structlog.get_logger(__name__)
# Pauses between attempts to pick a lost event feed up again.
WATCH_RETRY_FIRST = 0.2
WATCH_RETRY_MAX = 5.0


class OperatorCalls(CallBase):
    """Operator RPCs (ListWorkers, ListDevices, EndReservations, DrainWorker, WatchEvents ...)
    and the WorkerService calls a holder makes (device info, export, set mode, reboot)."""

    async def workers(self) -> list[Worker]:
        """Every worker the control knows."""
        found: list[Worker] = []
        token = ""
        while True:
            request = cpb.ListWorkersRequest(page_size=PAGE_SIZE, page_token=token)
            answer = await self._call("control", "ListWorkers", request)
            found += [convert.worker(w) for w in answer.workers]
            token = answer.next_page_token
            if not token:
                return found

    async def devices(self, selector: str = "", state: DeviceState | None = None) -> list[Device]:
        """Every device matching `selector` (and in `state`, when given)."""
        found: list[Device] = []
        token = ""
        wire_state = convert.device_state_value(state or DeviceState.UNSPECIFIED)
        while True:
            request = cpb.ListDevicesRequest(
                selector=selector, state=wire_state, page_size=PAGE_SIZE, page_token=token
            )
            answer = await self._call("control", "ListDevices", request)
            found += [convert.device(d) for d in answer.devices]
            token = answer.next_page_token
            if not token:
                return found

    async def device(self, device_id: str) -> Device:
        """One device by id (DeviceNotFound when there is none)."""
        answer = await self._call("control", "GetDevice", cpb.GetDeviceRequest(device_id=device_id))
        return convert.device(answer.device)

    async def end_reservations(
        self,
        *,
        reservation_ids: Sequence[str] = (),
        device_ids: Sequence[str] = (),
        client_id: str = "",
    ) -> Released:
        """End anyone's reservations (reason REVOKED) by ids, devices or client."""
        request = cpb.EndReservationsRequest(
            reservation_ids=list(reservation_ids), device_ids=list(device_ids), client_id=client_id
        )
        answer = await self._call("control", "EndReservations", request)
        return Released(tuple(answer.device_ids), tuple(answer.ended_reservation_ids))

    async def extend_reservations(
        self,
        *,
        reservation_ids: Sequence[str] = (),
        device_ids: Sequence[str] = (),
        client_id: str = "",
        duration: convert.DurationLike | None = None,
    ) -> list[Reservation]:
        """Extend anyone's reservations by ids, devices or client (operator)."""
        request = cpb.ExtendReservationsRequest(
            reservation_ids=list(reservation_ids), device_ids=list(device_ids), client_id=client_id
        )
        if duration is not None:
            request.duration.CopyFrom(convert.duration(duration))
        answer = await self._call("control", "ExtendReservations", request)
        return [convert.reservation(r) for r in answer.reservations]

    async def remove_device(self, device_id: str) -> Device:
        """Take a device out of the farm (its holder loses it)."""
        request = cpb.RemoveDeviceRequest(device_id=device_id)
        return convert.device((await self._call("control", "RemoveDevice", request)).device)

    async def reboot_device(self, device_id: str) -> Device:
        """Ask the device's worker to reboot it."""
        request = cpb.RebootDeviceRequest(device_id=device_id)
        return convert.device((await self._call("control", "RebootDevice", request)).device)

    async def drain_worker(
        self, worker: str, timeout: convert.DurationLike | None = None
    ) -> Worker:
        """No new reservations on `worker`; holders are told; it stops when the last ends."""
        request = cpb.DrainWorkerRequest(worker=worker)
        if timeout is not None:
            request.timeout.CopyFrom(convert.duration(timeout, "timeout"))
        return convert.worker((await self._call("control", "DrainWorker", request)).worker)

    async def watch_events(
        self, resume_after: int = 0, *, reconnect: bool = True
    ) -> AsyncIterator[Event]:
        """The operator feed: every change as it happens (until the caller stops iterating).
        Once it has been connected, a feed whose control restarts or whose replica goes away
        is picked up again where it left off (`resume_after` the last event seen), with
        pauses growing to 5 s; no event is repeated. A control that cannot be reached at the
        start is ControlUnavailable; `reconnect=False` ends the feed with it instead."""
        last, connected, pause = resume_after, False, WATCH_RETRY_FIRST
        while True:
            request = cpb.WatchEventsRequest(resume_after=last)
            call = self._control.WatchEvents(request, metadata=self.settings.metadata())
            try:
                async for response in call:
                    connected, pause = True, WATCH_RETRY_FIRST
                    event = convert.event(response.event)
                    if event.sequence and event.sequence <= last:
                        continue  # already given before the reconnect
                    last = max(last, event.sequence)
                    yield event
                failure: IcefarmError = ControlUnavailable("the event feed ended")
            except grpc.RpcError as error:
                failure = translate(error)
            finally:
                call.cancel()
            if not (reconnect and connected and isinstance(failure, ControlUnavailable)):
                raise failure
            log.warning("event feed lost; reconnecting", resume_after=last, error=failure.message)
            await asyncio.sleep(pause)
            pause = min(pause * 2, WATCH_RETRY_MAX)

    # ------------------------------------------------------------ a holder's worker calls

    def _endpoint(self, reservation: Reservation, device_id: str) -> str:
        for held in reservation.devices:
            if held.id == device_id:
                return held.worker_endpoint
        raise DeviceNotFound(f"reservation {reservation.id} holds no device {device_id!r}")

    async def board_info(self, reservation: Reservation, device_id: str) -> BoardInfo:
        """What a held board is doing, asked of its worker."""
        answer = await self._worker_call(
            self._endpoint(reservation, device_id),
            "GetDeviceInfo",
            wpb.GetDeviceInfoRequest(device_id=device_id),
            reservation.token,
        )
        return convert.board_info(answer.device)

    async def export(self, reservation: Reservation, device_id: str) -> ExportInfo:
        """usbip mode: have the worker export the board; where to attach it."""
        endpoint = self._endpoint(reservation, device_id)
        answer = await self._worker_call(
            endpoint, "Export", wpb.ExportRequest(device_id=device_id), reservation.token
        )
        host = answer.host or endpoint.rsplit(":", 1)[0]
        return ExportInfo(device_id, answer.bus_id, host, answer.port)

    async def set_mode(
        self,
        reservation: Reservation,
        device_id: str,
        mode: str,
        mode_args: dict[str, str] | None = None,
    ) -> BoardInfo:
        """Switch a held board to another mode."""
        request = wpb.SetModeRequest(device_id=device_id, mode=mode, mode_args=mode_args or {})
        answer = await self._worker_call(
            self._endpoint(reservation, device_id), "SetMode", request, reservation.token
        )
        return convert.board_info(answer.device)

    async def reboot_board(self, reservation: Reservation, device_id: str) -> BoardInfo:
        """Re-flash a held board's mode (its worker carries on with the queue)."""
        request = wpb.WorkerServiceRebootDeviceRequest(device_id=device_id)
        answer = await self._worker_call(
            self._endpoint(reservation, device_id), "RebootDevice", request, reservation.token
        )
        return convert.board_info(answer.device)
