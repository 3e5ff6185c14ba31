"""gRPC server options shared by the control and the workers (ARCHITECTURE §7).

Clients ping every 10 s; servers accept pings every 5 s even without calls, and ping idle peers
themselves so half-open connections are found. `so_reuseport=0` makes a port that is already
taken an error instead of a silent second listener.
"""

from __future__ import annotations


def server_options(max_receive: int, max_send: int) -> list[tuple[str, int]]:
    """The options for a grpc.aio server taking messages up to `max_receive` bytes."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.max_send_message_length", max_send),
    ]
