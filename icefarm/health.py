"""gRPC health checking with `List` (grpcio's asyncio servicer answers only Check and Watch: a
`Health/List` call raised NotImplementedError and printed a traceback)."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):
    """Check, Watch and List of every service this process reports on."""

    # The type stubs know neither List's messages nor the servicer's status table.
    async def List(self, request: Any, context: Any) -> Any:
        known: dict[str, Any] = self._server_status  # type: ignore[attr-defined]
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in sorted(known.items())
        }
        return health_pb2.HealthListResponse(statuses=statuses)  # type: ignore[attr-defined]
