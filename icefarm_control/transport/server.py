"""The gRPC server: services, health, reflection, keepalive, message limits."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from icefarm.handlers import add_servicer
from icefarm.health import HealthServicer
from icefarm.reflection import enable_reflection
from icefarm.server_options import server_options
from icefarm.v1 import (
    control_service_pb2,
    reservation_service_pb2,
)
from icefarm_control.domain.settings import MAX_MESSAGE_BYTES
from icefarm_control.transport.control import ControlServicer
from icefarm_control.transport.reservations import ReservationServicer
from icefarm_control.transport.validation import validated

RESERVATION_SERVICE = reservation_service_pb2.DESCRIPTOR.services_by_name["ReservationService"]
CONTROL_SERVICE = control_service_pb2.DESCRIPTOR.services_by_name["ControlService"]
SERVICE_NAMES = (RESERVATION_SERVICE.full_name, CONTROL_SERVICE.full_name)

SERVER_OPTIONS = server_options(MAX_MESSAGE_BYTES, 16 * MAX_MESSAGE_BYTES)


class BindError(RuntimeError):
    """The listen address could not be bound."""


def build_server(
    reservations: ReservationServicer, control: ControlServicer, listen: str
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A server with every service added and bound to `listen`; returns it and its port.
    Every request message passes the edge check (transport/validation.py) first."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    # Bytes that are not the request message are INVALID_ARGUMENT (icefarm/handlers.py).
    add_servicer(server, RESERVATION_SERVICE, validated(reservations, RESERVATION_SERVICE))
    add_servicer(server, CONTROL_SERVICE, validated(control, CONTROL_SERVICE))
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, (*SERVICE_NAMES, health.SERVICE_NAME))
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise BindError(f"cannot listen on {listen}: {exc}") from exc
    if port == 0:
        raise BindError(f"cannot listen on {listen}: address in use or not available")
    return server, health_servicer, port


async def mark_serving(health_servicer: health.aio.HealthServicer) -> None:
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
