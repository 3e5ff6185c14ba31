"""ReservationService: parse the request, call the engine, map the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from icefarm.v1 import reservation_service_pb2 as pb
from icefarm.v1 import reservation_service_pb2_grpc as pb_grpc
from icefarm_control.domain.requests import check_reserve
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.transport import convert
from icefarm_control.transport.client_session import ClientSessionHandler
from icefarm_control.transport.errors import translate_errors
from icefarm_control.transport.identity import caller_identity

Context = grpc.aio.ServicerContext[Any, Any]


class ReservationServicer(pb_grpc.ReservationServiceServicer):
    def __init__(
        self, engine: ReservationEngine, *, sessions: ClientSessionHandler | None = None
    ) -> None:
        self.engine = engine
        self.sessions = sessions or ClientSessionHandler.for_engine(engine)

    @translate_errors
    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        caller = caller_identity(context, required=True)
        spec = check_reserve(
            count=request.count,
            device_ids=list(request.device_ids),
            selector=request.selector,
            mode=request.mode,
            mode_args=dict(request.mode_args),
            lease=convert.optional_duration(
                "duration", request.duration, request.HasField("duration")
            ),
            wait=convert.optional_duration(
                "wait_timeout", request.wait_timeout, request.HasField("wait_timeout")
            ),
            request_id=request.request_id,
            default_lease=self.engine.timers.default_lease,
            limits=self.engine.limits,
            wait_for_new_devices=request.wait_for_new_devices,
        )
        grant = await self.engine.reserve(caller.client_id, spec)
        return pb.ReserveResponse(
            reservation=convert.reservation(grant.reservation), token=grant.token
        )

    @translate_errors
    async def Extend(self, request: pb.ExtendRequest, context: Context) -> pb.ExtendResponse:
        caller = caller_identity(context, required=True)
        grants = await self.engine.extend(
            caller.client_id,
            reservation_ids=list(request.reservation_ids),
            everything=request.all,
            lease=convert.optional_duration(
                "duration", request.duration, request.HasField("duration")
            ),
        )
        return pb.ExtendResponse(
            reservations=[convert.reservation(g.reservation) for g in grants],
            tokens={g.reservation.id: g.token for g in grants},
        )

    @translate_errors
    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        caller = caller_identity(context, required=True)
        outcome = await self.engine.release(
            caller.client_id,
            device_ids=list(request.device_ids),
            reservation_ids=list(request.reservation_ids),
            everything=request.all,
        )
        return pb.ReleaseResponse(
            device_ids=outcome.device_ids, ended_reservation_ids=outcome.ended_reservation_ids
        )

    @translate_errors
    async def ListReservations(
        self, request: pb.ListReservationsRequest, context: Context
    ) -> pb.ListReservationsResponse:
        caller = caller_identity(context, required=True)
        page = await self.engine.list_reservations(
            caller.client_id,
            include_ended=request.include_ended,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListReservationsResponse(
            reservations=[convert.reservation(r) for r in page.reservations],
            next_page_token=page.next_page_token,
        )

    @translate_errors
    async def GetAvailability(
        self, request: pb.GetAvailabilityRequest, context: Context
    ) -> pb.GetAvailabilityResponse:
        caller_identity(context, required=False)
        ids = await self.engine.availability(request.selector)
        return pb.GetAvailabilityResponse(count=len(ids), device_ids=ids)

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: Context
    ) -> AsyncIterator[pb.SessionResponse]:
        async for response in self.sessions.serve(request_iterator, context):
            yield response
