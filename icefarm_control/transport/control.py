"""ControlService: the operator RPCs and the worker stream (transport/worker_session.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from icefarm.v1 import control_service_pb2 as pb
from icefarm.v1 import control_service_pb2_grpc as pb_grpc
from icefarm_control.domain.inventory import Inventory
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.workers import WorkerRegistry
from icefarm_control.transport import convert
from icefarm_control.transport.errors import translate_errors
from icefarm_control.transport.identity import caller_identity
from icefarm_control.transport.watch import watch_events
from icefarm_control.transport.worker_session import WorkerSessionHandler

Context = grpc.aio.ServicerContext[Any, Any]


class ControlServicer(pb_grpc.ControlServiceServicer):
    def __init__(
        self,
        engine: ReservationEngine,
        inventory: Inventory,
        *,
        workers: WorkerRegistry,
        worker_sessions: WorkerSessionHandler,
    ) -> None:
        self.engine = engine
        self.inventory = inventory
        self.workers = workers
        self.worker_sessions = worker_sessions

    @translate_errors
    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: Context
    ) -> pb.ListWorkersResponse:
        caller_identity(context, required=False)
        page = await self.inventory.list_workers(request.page_size, request.page_token)
        return pb.ListWorkersResponse(
            workers=[convert.worker(w) for w in page.workers],
            next_page_token=page.next_page_token,
        )

    @translate_errors
    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: Context
    ) -> pb.ListDevicesResponse:
        caller_identity(context, required=False)
        page = await self.inventory.list_devices(
            request.selector,
            convert.parse_device_state(request.state),
            request.page_size,
            request.page_token,
        )
        return pb.ListDevicesResponse(
            devices=[convert.device(d) for d in page.devices],
            next_page_token=page.next_page_token,
        )

    @translate_errors
    async def GetDevice(
        self, request: pb.GetDeviceRequest, context: Context
    ) -> pb.GetDeviceResponse:
        caller_identity(context, required=False)
        return pb.GetDeviceResponse(
            device=convert.device(await self.inventory.get_device(request.device_id))
        )

    @translate_errors
    async def EndReservations(
        self, request: pb.EndReservationsRequest, context: Context
    ) -> pb.EndReservationsResponse:
        caller_identity(context, required=False)
        outcome = await self.engine.end_reservations(
            device_ids=list(request.device_ids),
            reservation_ids=list(request.reservation_ids),
            client_id=request.client_id,
        )
        return pb.EndReservationsResponse(
            device_ids=outcome.device_ids, ended_reservation_ids=outcome.ended_reservation_ids
        )

    @translate_errors
    async def ExtendReservations(
        self, request: pb.ExtendReservationsRequest, context: Context
    ) -> pb.ExtendReservationsResponse:
        caller_identity(context, required=False)
        grants = await self.engine.extend(
            None,
            reservation_ids=list(request.reservation_ids),
            device_ids=list(request.device_ids),
            owner_filter=request.client_id,
            lease=convert.optional_duration(
                "duration", request.duration, request.HasField("duration")
            ),
        )
        return pb.ExtendReservationsResponse(
            reservations=[convert.reservation(g.reservation) for g in grants]
        )

    @translate_errors
    async def RemoveDevice(
        self, request: pb.RemoveDeviceRequest, context: Context
    ) -> pb.RemoveDeviceResponse:
        caller_identity(context, required=False)
        device = await self.inventory.remove_device(request.device_id)
        return pb.RemoveDeviceResponse(device=convert.device(device))

    @translate_errors
    async def RebootDevice(
        self, request: pb.RebootDeviceRequest, context: Context
    ) -> pb.RebootDeviceResponse:
        caller_identity(context, required=False)
        device = await self.workers.reboot_device(request.device_id)
        return pb.RebootDeviceResponse(device=convert.device(device))

    @translate_errors
    async def DrainWorker(
        self, request: pb.DrainWorkerRequest, context: Context
    ) -> pb.DrainWorkerResponse:
        caller_identity(context, required=False)
        timeout = convert.optional_duration("timeout", request.timeout, request.HasField("timeout"))
        worker = await self.workers.drain(request.worker, timeout, tell_worker=True)
        return pb.DrainWorkerResponse(worker=convert.worker(worker))

    async def WorkerSession(
        self, request_iterator: AsyncIterator[pb.WorkerSessionRequest], context: Context
    ) -> AsyncIterator[pb.WorkerSessionResponse]:
        async for response in self.worker_sessions.serve(request_iterator, context):
            yield response

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        feed = watch_events(self.engine.db, self.engine.notifier, request, context)
        async for response in feed:
            yield response
