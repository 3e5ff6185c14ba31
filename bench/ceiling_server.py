"""The ceiling for bench/reserve_release.py: a minimal grpc.aio server whose Reserve and Release
handlers each run one PostgreSQL `UPDATE … RETURNING` and nothing else."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from icefarm.v1 import reservation_service_pb2 as pb
from icefarm.v1 import reservation_service_pb2_grpc as pb_grpc

UPDATE = text("UPDATE bench_counter SET n = n + 1 WHERE id = :id RETURNING n")


class Ceiling(pb_grpc.ReservationServiceServicer):
    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(url, pool_size=10, max_overflow=10)

    async def setup(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                text("CREATE TABLE IF NOT EXISTS bench_counter (id int primary key, n bigint)")
            )
            await conn.execute(text("DELETE FROM bench_counter"))
            await conn.execute(
                text("INSERT INTO bench_counter SELECT g, 0 FROM generate_series(0, 63) g")
            )

    async def _one_update(self, key: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(UPDATE, {"id": key % 64})

    async def Reserve(self, request: pb.ReserveRequest, context: Any) -> pb.ReserveResponse:
        await self._one_update(request.count)
        return pb.ReserveResponse()

    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        await self._one_update(len(request.reservation_ids))
        return pb.ReleaseResponse()


async def main(url: str) -> None:
    servicer = Ceiling(url)
    await servicer.setup()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ReservationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
