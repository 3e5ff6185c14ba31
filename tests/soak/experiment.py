"""One soak client: a real experiment loop through the client library, in its own process (so a
SIGKILL of it is real), writing what it saw as JSON lines for the soak to judge.

    python -m tests.soak.experiment --control TARGET --index I --life L --seed S
        --boards ID,ID,... --log FILE --stop FILE --until EPOCH

Each experiment reserves (with or without waiting; some name boards, some use a selector),
evaluates deterministic bitstreams in `pulsecount` or `varmax`, sometimes extends, sometimes
ends early, and releases. Every record carries `t` (epoch seconds). Records: `start`,
`reserve` (asked), `granted`, `refused` (told nothing is held: `held` lists what the control
says this client holds right after), `submit`, `result`, `extended`, `released`, `error`,
`end` (with `pending`: bitstreams left without a result and why), `event`, `wire` (each
Session event sequence as it arrived on the stream, before the library drops repeats), `exit`.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from icefarm.logs import configure_logging
from icefarm_client import Client
from icefarm_client.connection import RetryPolicy
from icefarm_client.errors import IcefarmError, NotEnoughDevices
from icefarm_client.models import Event, Result

BITSTREAM_BYTES = 104090
LEASE = timedelta(seconds=90)


def bitstream_data(bitstream_id: str) -> bytes:
    """The bytes of a soak bitstream, a function of its id (the soak recomputes them to know
    what the simulator must answer)."""
    return random.Random(bitstream_id).randbytes(BITSTREAM_BYTES)


class Log:
    """JSON lines, one write per record (a SIGKILL loses at most the record being written)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)
        self._lock = threading.Lock()

    def write(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"t": time.time(), "kind": kind, **fields}, default=str)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()


@dataclass
class Plan:
    """What one experiment does, drawn from the client's seeded generator."""

    count: int
    mode: str
    wait: float
    device_ids: list[str]
    bitstreams: int
    end_early: bool
    extend: bool
    selector: str = ""
    ids: list[str] = field(default_factory=list)


def draw_plan(rng: random.Random, boards: list[str]) -> Plan:
    count = rng.choice([1, 1, 2, 2, 3])
    named = rng.random() < 0.2 and len(boards) >= count
    return Plan(
        count=count,
        mode=rng.choice(["pulsecount", "varmax"]),
        wait=rng.uniform(3.0, 12.0) if rng.random() < 0.6 else 0.0,
        device_ids=sorted(rng.sample(boards, count)) if named else [],
        bitstreams=rng.randint(4, 14),
        end_early=rng.random() < 0.2,
        extend=rng.random() < 0.3,
        selector="kind=pico2-ice" if rng.random() < 0.3 and not named else "",
    )


class Experimenter:
    def __init__(self, args: argparse.Namespace, log: Log) -> None:
        self.args = args
        self.log = log
        self.rng = random.Random(f"{args.seed}:{args.index}:{args.life}")
        self.boards = [b for b in args.boards.split(",") if b]
        # One identity per process: a killed experiment's reservations end with CLIENT_LOST
        # after the grace, while its restarted successor works on.
        self.client_id = f"soak-{args.index}-{args.life}"

    def stopping(self) -> bool:
        return time.time() >= self.args.until or Path(self.args.stop).exists()

    def run(self) -> None:
        retry = RetryPolicy(attempts=8, initial_backoff=0.2, max_backoff=2.0)
        with Client(self.args.control, client_id=self.client_id, retry=retry, timeout=15) as c:
            self._watch_wire(c)
            c.on(None, self._on_event)
            self.log.write("start", client=self.client_id, instance=c.session_instance)
            number = 0
            while not self.stopping():
                number += 1
                self.experiment(c, number)
                time.sleep(self.rng.uniform(0.2, 1.5))
        self.log.write("exit")

    def _watch_wire(self, client: Client) -> None:
        # Instrumentation for the soak only: every sequence as it arrived on the stream,
        # before the library drops a repeat, so a duplicate on the wire is seen too.
        feed = client.aio.session
        accept = feed._accept

        def logged(message: Any) -> None:
            self.log.write("wire", seq=int(message.sequence), connection=feed.connections)
            accept(message)

        feed._accept = logged  # type: ignore[method-assign]

    def _on_event(self, event: Event) -> None:
        self.log.write(
            "event",
            type=event.type.value,
            seq=event.sequence,
            reservation=event.reservation_id,
            reservations=list(event.reservation_ids),
            device=event.device_id,
            devices=list(event.device_ids),
            reason=event.reason.value,
            closed=event.reservation_closed,
        )

    def experiment(self, client: Client, number: int) -> None:
        plan = draw_plan(self.rng, self.boards)
        tag = f"{self.client_id}.{self.args.life}.{number}"
        plan.ids = [f"{tag}.{n}" for n in range(plan.bitstreams)]
        self.log.write("reserve", exp=number, **_plan_fields(plan))
        options: dict[str, Any] = {
            "mode": plan.mode,
            "duration": LEASE,
            "ready_timeout": timedelta(seconds=30),
        }
        if plan.device_ids:
            options["device_ids"] = plan.device_ids
        if plan.selector:
            options["selector"] = plan.selector
        if plan.wait:
            options["wait"] = timedelta(seconds=plan.wait)
        results: set[str] = set()
        submitted: list[str] = []
        reservation = ""
        holder = client.reserve(0 if plan.device_ids else plan.count, **options)
        try:
            with holder as farm:
                reservation = farm.id
                self.log.write(
                    "granted",
                    exp=number,
                    reservation=farm.id,
                    devices=[d.id for d in farm.reservation.devices],
                    ready=[d.id for d in farm.devices],
                )
                if plan.extend:
                    farm.extend(LEASE)
                    self.log.write("extended", exp=number, reservation=farm.id)
                self._evaluate(farm, plan, number, submitted, results)
                released = farm.release()
                self.log.write(
                    "released",
                    exp=number,
                    reservation=farm.id,
                    ended=list(released.ended_reservation_ids),
                )
        except NotEnoughDevices as exc:
            held = [r.id for r in client.reservations()]
            self.log.write("refused", exp=number, error=type(exc).__name__, held=held)
            return
        except IcefarmError as exc:
            reservation = reservation or _created(holder)
            why = f"{type(exc).__name__}: {exc.message}"
            self.log.write("error", exp=number, reservation=reservation, error=why)
            pending = [i for i in submitted if i not in results]
            self.log.write("end", exp=number, reservation=reservation, pending=pending, why=why)
            return
        pending = [i for i in submitted if i not in results]
        self.log.write("end", exp=number, reservation=reservation, pending=pending, why="early")

    def _evaluate(
        self, farm: Any, plan: Plan, number: int, submitted: list[str], results: set[str]
    ) -> None:
        def bitstreams() -> Iterator[tuple[str, bytes]]:
            for bitstream_id in plan.ids:
                submitted.append(bitstream_id)
                self.log.write("submit", exp=number, id=bitstream_id, mode=plan.mode)
                yield bitstream_id, bitstream_data(bitstream_id)

        stop_after = len(plan.ids) // 2 if plan.end_early else len(plan.ids)
        evaluation = farm.evaluate(bitstreams(), in_flight=2)
        for result in evaluation:
            self._log_result(number, result)
            results.add(result.bitstream_id)
            if len(results) >= stop_after and plan.end_early:
                evaluation.close()
                break

    def _log_result(self, number: int, result: Result) -> None:
        self.log.write(
            "result",
            exp=number,
            id=result.bitstream_id,
            device=result.device_id,
            pulse_count=result.pulse_count,
            variance=result.variance,
            error=result.error,
            attempt=result.attempt,
            run=round(result.run_duration.total_seconds(), 4),
        )


def _created(holder: Any) -> str:
    """The id of a reservation made before entering the block failed (it is still ours)."""
    made = holder._farm._reservation
    return str(made.id) if made is not None else ""


def _plan_fields(plan: Plan) -> dict[str, Any]:
    return {
        "count": plan.count,
        "mode": plan.mode,
        "wait": plan.wait,
        "device_ids": plan.device_ids,
        "selector": plan.selector,
        "bitstreams": plan.bitstreams,
        "end_early": plan.end_early,
        "extend": plan.extend,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--control", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--life", type=int, default=0)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--boards", default="")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--stop", type=Path, required=True)
    parser.add_argument("--until", type=float, required=True)
    args = parser.parse_args()
    configure_logging("console", "error")
    log = Log(args.log)
    try:
        Experimenter(args, log).run()
    except Exception as exc:  # recorded, so the soak reports it instead of a silent death
        log.write("crash", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        log.close()


if __name__ == "__main__":
    main()
