"""An Evaluate stream is bounded: the worker holds at most `evaluate_queue_per_board` bitstreams
per board of the stream (queued, running, or with a result not yet sent) and reads no more
until one has gone out, so a client that writes without reading is held back by gRPC flow
control instead of growing the worker. A single bitstream is bounded too."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from icefarm.limits import MAX_BITSTREAM_BYTES
from icefarm.v1 import types_pb2 as tpb
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm_worker.app import MAX_MESSAGE_BYTES
from icefarm_worker.evaluation import EvaluationRun
from icefarm_worker.simulator import expected_pulse_count
from tests.grpc_errors import bad_fields_of
from tests.integration.worker_farm import eventually
from tests.worker.daemon.harness import (
    ControlUnderTest,
    all_in_state,
    bitstream,
    evaluate,
    reserve_ready,
    simulated_worker,
    token_metadata,
    worker_stub,
)

BOARDS = 2
QUEUE_PER_BOARD = 2
BOUND = BOARDS * QUEUE_PER_BOARD


async def test_a_stream_whose_results_are_not_read_holds_no_more_than_its_bound(
    control: ControlUnderTest, sim_root: Path
) -> None:
    async with simulated_worker(
        control.address,
        sim_root,
        BOARDS,
        circuit_seconds=0.1,
        evaluate_queue_per_board=QUEUE_PER_BOARD,
    ) as (worker, _farm):
        await all_in_state(control, BOARDS, tpb.DEVICE_STATE_AVAILABLE)
        answer = await reserve_ready(control, "alice", BOARDS)
        data = {f"b{i:03d}": bitstream(i) for i in range(10 * BOUND)}
        written = 0

        async def requests() -> AsyncIterator[wpb.EvaluateRequest]:
            nonlocal written
            for key, value in data.items():
                yield wpb.EvaluateRequest(bitstream=wpb.Bitstream(id=key, data=value))
                written += 1

        channel, stub = worker_stub(worker)
        async with channel:
            call = stub.Evaluate(requests(), metadata=token_metadata(answer.token))

            async def full() -> EvaluationRun | None:
                runs = list(worker.servicer.runs)
                if runs and runs[0].in_flight >= BOUND and written > BOUND:
                    return runs[0]
                return None

            # Nothing read yet: the client has written more than the bound, the worker holds
            # the bound and no more.
            run: EvaluationRun = await eventually(full, what="the stream's bound reached")
            assert run.limit == BOUND
            assert run.in_flight == BOUND
            results = [response.result async for response in call]

        assert run.peak_in_flight == BOUND
        assert Counter(r.bitstream_id for r in results) == Counter(data.keys())
        for result in results:
            assert result.error == ""
            assert result.pulse_count == expected_pulse_count(data[result.bitstream_id])
        assert not worker.servicer.runs


async def test_a_bitstream_over_the_size_limit_is_refused_naming_the_field(
    control: ControlUnderTest, sim_root: Path
) -> None:
    async with simulated_worker(control.address, sim_root, 1) as (worker, _farm):
        await all_in_state(control, 1, tpb.DEVICE_STATE_AVAILABLE)
        answer = await reserve_ready(control, "alice", 1)
        channel, stub = worker_stub(worker)
        async with channel:
            too_big = [wpb.Bitstream(id="big", data=bytes(MAX_BITSTREAM_BYTES + 1))]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await evaluate(stub, answer.token, too_big)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad_fields_of(refused.value) == ["bitstream.data"]
            assert str(MAX_BITSTREAM_BYTES) in (refused.value.details() or "")

            # Past the message limit gRPC refuses it before it is read whole.
            huge = [wpb.Bitstream(id="huge", data=bytes(MAX_MESSAGE_BYTES + 1))]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await evaluate(stub, answer.token, huge)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            fits = bitstream(7)
            results = await evaluate(stub, answer.token, [wpb.Bitstream(id="ok", data=fits)])
        assert [(r.bitstream_id, r.pulse_count) for r in results] == [
            ("ok", expected_pulse_count(fits))
        ]
