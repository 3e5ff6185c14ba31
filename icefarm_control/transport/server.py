"""The gRPC server: services, health, reflection, keepalive, message limits."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from icefarm.reflection import enable_reflection
from icefarm.v1 import (
    control_service_pb2,
    control_service_pb2_grpc,
    reservation_service_pb2,
    reservation_service_pb2_grpc,
)
from icefarm_control.transport.control import ControlServicer
from icefarm_control.transport.reservations import ReservationServicer

MAX_MESSAGE_BYTES = 1024 * 1024
SERVICE_NAMES = (
    reservation_service_pb2.DESCRIPTOR.services_by_name["ReservationService"].full_name,
    control_service_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
)

# ARCHITECTURE §7: clients ping every 10 s; we accept pings every 5 s even without calls, and
# ping idle clients ourselves so half-open connections are found. so_reuseport=0 makes a port
# that is already taken an error instead of a silent second listener.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", 16 * MAX_MESSAGE_BYTES),
]


class BindError(RuntimeError):
    """The listen address could not be bound."""


def build_server(
    reservations: ReservationServicer, control: ControlServicer, listen: str
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A server with every service added and bound to `listen`; returns it and its port."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    reservation_service_pb2_grpc.add_ReservationServiceServicer_to_server(reservations, server)
    control_service_pb2_grpc.add_ControlServiceServicer_to_server(control, server)
    health_servicer = health.aio.HealthServicer()
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
