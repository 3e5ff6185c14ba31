"""A worker on simulated boards against a real control: boards come up, a reservation
evaluates bitstreams on them, the results belong to their bitstreams."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from icefarm.v1 import types_pb2 as tpb
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm_worker.simulator import expected_pulse_count
from tests.worker.daemon.harness import (
    ControlUnderTest,
    all_in_state,
    bitstream,
    evaluate,
    reserve_ready,
    simulated_worker,
    worker_stub,
)


async def test_eight_boards_come_up_and_evaluate_two_hundred_bitstreams(
    control: ControlUnderTest, sim_root: Path
) -> None:
    async with simulated_worker(control.address, sim_root, 8) as (worker, _farm):
        boards = await all_in_state(control, 8, tpb.DEVICE_STATE_AVAILABLE)
        assert {b.worker_endpoint for b in boards} == {worker.endpoint}

        answer = await reserve_ready(control, "alice", 8)
        data = {f"b{i:03d}": bitstream(i) for i in range(200)}
        channel, stub = worker_stub(worker)
        async with channel:
            results = await evaluate(
                stub, answer.token, (wpb.Bitstream(id=k, data=v) for k, v in data.items())
            )

        assert sorted(r.bitstream_id for r in results) == sorted(data)
        for result in results:
            assert result.error == ""
            assert result.pulse_count == expected_pulse_count(data[result.bitstream_id])
        per_board = Counter(r.device_id for r in results)
        assert set(per_board) == {d.id for d in answer.reservation.devices}
