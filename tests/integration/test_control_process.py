"""`icefarm-control` as a real process: grpcurl, SIGTERM, restart, bad settings, db commands."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import control_service_pb2_grpc, reservation_service_pb2_grpc, types_pb2
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm_control.config import SETTINGS
from icefarm_control.storage import waiter_queries as waiter_q
from icefarm_control.storage.database import Database
from icefarm_control.storage.migrate import head_revision, upgrade
from icefarm_control.storage.testing import seed_farm
from tests.grpc_errors import reason_of
from tests.integration.conftest import BIN, ControlProcess, as_client, start_control_process

CONTROL = BIN / "icefarm-control"
GRPCURL = BIN / "grpcurl"
SCHEMA_TABLES = {
    "workers",
    "devices",
    "reservations",
    "reservation_devices",
    "waiters",
    "events",
    "worker_commands",
    "api_tokens",
}


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run(*argv: str | Path, env: dict[str, str] | None = None, timeout: float = 30) -> Finished:
    """Run a command to its end (killed and failed after `timeout`)."""
    result = subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "100", **(env or {})},
        check=False,
    )
    return Finished(result.returncode, result.stdout, result.stderr)


def sqlite_url(tmp_path: Path, name: str = "control.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def start(
    factory: list[ControlProcess], database_url: str, *extra: str, env: dict[str, str] | None = None
) -> ControlProcess:
    control = start_control_process(database_url, *extra, env=env)
    factory.append(control)
    return control


def finish(control: ControlProcess, timeout: float = 20) -> tuple[int, str]:
    """Wait for the process to exit; its exit code and everything it printed."""
    rest, _ = control.process.communicate(timeout=timeout)
    return control.process.returncode, "".join(control.log_lines) + rest


def terminate(control: ControlProcess, timeout: float = 20) -> tuple[int, str]:
    control.process.send_signal(signal.SIGTERM)
    return finish(control, timeout)


def log_records(output: str) -> list[dict[str, object]]:
    records = []
    for line in output.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


async def seed(database_url: str, boards: int) -> list[str]:
    database = Database(database_url)
    try:
        await upgrade(database)
        return await seed_farm(database, workers=1, boards_per_worker=boards)
    finally:
        await database.dispose()


async def until_waiting(database_url: str, count: int, timeout: float = 10) -> None:
    """Poll the waiters table until `count` Reserve calls are queued."""
    database = Database(database_url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while loop.time() < deadline:
            async with database.read() as conn:
                if len(await waiter_q.waiting(conn)) >= count:
                    return
            await asyncio.sleep(0.02)
    finally:
        await database.dispose()
    raise AssertionError(f"fewer than {count} waiters queued within {timeout}s")


async def table_names(database_url: str) -> set[str]:
    database = Database(database_url)

    def names(connection: Connection) -> set[str]:
        return set(inspect(connection).get_table_names())

    try:
        async with database.engine.connect() as conn:
            return await conn.run_sync(names)
    finally:
        await database.dispose()


def short_form(database_url: str) -> str:
    """The URL as people type it: sqlite:///PATH or postgresql://USER@HOST/DB."""
    return database_url.replace("sqlite+aiosqlite://", "sqlite://").replace(
        "postgresql+psycopg://", "postgresql://"
    )


def reservations_stub(
    channel: grpc.aio.Channel,
) -> reservation_service_pb2_grpc.ReservationServiceAsyncStub:
    return reservation_service_pb2_grpc.ReservationServiceStub(channel)


def watch_health(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryStreamCall[Any, health_pb2.HealthCheckResponse]:
    """Health/Watch for the whole server (the grpc_health stubs do not type HealthStub.Watch)."""
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return watch(health_pb2.HealthCheckRequest())


# grpcurl: reflection and JSON transcoding work against a real process.


def test_grpcurl_lists_every_service_through_reflection(
    tmp_path: Path, control_process_factory: list[ControlProcess]
) -> None:
    control = start(control_process_factory, sqlite_url(tmp_path))
    result = run(GRPCURL, "-plaintext", control.address, "list")
    assert result.returncode == 0, result.output
    assert {
        "icefarm.v1.ReservationService",
        "icefarm.v1.ControlService",
        "grpc.health.v1.Health",
    } <= set(result.stdout.split())


def test_grpcurl_describes_reserve(
    tmp_path: Path, control_process_factory: list[ControlProcess]
) -> None:
    control = start(control_process_factory, sqlite_url(tmp_path))
    result = run(
        GRPCURL, "-plaintext", control.address, "describe", "icefarm.v1.ReservationService.Reserve"
    )
    assert result.returncode == 0, result.output
    assert "rpc Reserve ( .icefarm.v1.ReserveRequest )" in result.stdout
    assert ".icefarm.v1.ReserveResponse" in result.stdout


def test_grpcurl_health_check_reports_serving(
    tmp_path: Path, control_process_factory: list[ControlProcess]
) -> None:
    control = start(control_process_factory, sqlite_url(tmp_path))
    result = run(GRPCURL, "-plaintext", control.address, "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.output
    assert json.loads(result.stdout) == {"status": "SERVING"}
    # List too (grpcio's servicer left it unimplemented: a traceback in the control's log).
    listed = run(GRPCURL, "-plaintext", control.address, "grpc.health.v1.Health/List")
    assert listed.returncode == 0, listed.output
    statuses = json.loads(listed.stdout)["statuses"]
    assert statuses["icefarm.v1.ReservationService"] == {"status": "SERVING"}
    assert not any("Traceback" in line for line in control.log_lines)


async def test_grpcurl_reserve_returns_a_reservation_and_a_token(
    tmp_path: Path, control_process_factory: list[ControlProcess]
) -> None:
    url = sqlite_url(tmp_path)
    (board,) = await seed(url, boards=1)
    control = start(control_process_factory, url)
    result = await asyncio.to_thread(
        run,
        GRPCURL,
        "-plaintext",
        "-H",
        "icefarm-client-id: lab-user",
        "-d",
        '{"count": 1, "duration": "120s"}',
        control.address,
        "icefarm.v1.ReservationService/Reserve",
    )
    assert result.returncode == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["token"]
    reservation = answer["reservation"]
    assert reservation["id"]
    assert reservation["client_id"] == "lab-user"
    assert reservation["state"] == "RESERVATION_STATE_ACTIVE"
    assert [device["id"] for device in reservation["devices"]] == [board]
    lease = datetime.fromisoformat(reservation["end_time"]) - datetime.fromisoformat(
        reservation["create_time"]
    )
    assert abs(lease.total_seconds() - 120) < 1


def test_grpcurl_bad_reserve_exits_non_zero_with_invalid_argument(
    tmp_path: Path, control_process_factory: list[ControlProcess]
) -> None:
    control = start(control_process_factory, sqlite_url(tmp_path))
    result = run(
        GRPCURL,
        "-plaintext",
        "-H",
        "icefarm-client-id: lab-user",
        "-d",
        '{"count": -1}',
        control.address,
        "icefarm.v1.ReservationService/Reserve",
    )
    assert result.returncode != 0
    assert "InvalidArgument" in result.output
    assert "count" in result.output


# Shutdown and restart.


async def test_sigterm_turns_health_not_serving_and_lets_an_in_flight_reserve_finish(
    database_url: str, control_process_factory: list[ControlProcess]
) -> None:
    await seed(database_url, boards=1)
    control = start(control_process_factory, database_url, "--shutdown-grace", "10s")
    async with grpc.aio.insecure_channel(control.address) as channel:
        stub = reservations_stub(channel)
        await stub.Reserve(rpb.ReserveRequest(count=1), metadata=as_client("holder"))
        waiting = asyncio.ensure_future(
            stub.Reserve(
                rpb.ReserveRequest(count=1, wait_timeout=seconds(3)), metadata=as_client("late")
            )
        )
        await until_waiting(database_url, 1)
        watch = watch_health(channel)
        first = await asyncio.wait_for(watch.read(), 10)
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        assert not waiting.done()

        control.process.send_signal(signal.SIGTERM)

        second = await asyncio.wait_for(watch.read(), 10)
        assert isinstance(second, health_pb2.HealthCheckResponse)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(waiting, 15)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert reason_of(caught.value) == "NOT_ENOUGH_DEVICES"
        watch.cancel()
    code, output = await asyncio.to_thread(finish, control)
    assert code == 0, output
    assert "Traceback" not in output
    assert "control stopped" in output


async def test_a_waiter_cut_off_by_shutdown_leaves_the_queue(
    database_url: str, control_process_factory: list[ControlProcess]
) -> None:
    await seed(database_url, boards=1)
    control = start(control_process_factory, database_url, "--shutdown-grace", "0.2s")
    async with grpc.aio.insecure_channel(control.address) as channel:
        stub = reservations_stub(channel)
        await stub.Reserve(rpb.ReserveRequest(count=1), metadata=as_client("holder"))
        waiting = asyncio.ensure_future(
            stub.Reserve(
                rpb.ReserveRequest(count=1, wait_timeout=seconds(60)), metadata=as_client("late")
            )
        )
        await until_waiting(database_url, 1)
        control.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(waiting, 15)
    code, output = await asyncio.to_thread(finish, control)
    assert code == 0, output
    database = Database(database_url)
    try:
        async with database.read() as conn:
            assert await waiter_q.waiting(conn) == []
    finally:
        await database.dispose()


async def test_a_restarted_control_keeps_active_reservations_and_held_boards(
    database_url: str, control_process_factory: list[ControlProcess]
) -> None:
    await seed(database_url, boards=1)
    first = start(control_process_factory, database_url)
    async with grpc.aio.insecure_channel(first.address) as channel:
        granted = await reservations_stub(channel).Reserve(
            rpb.ReserveRequest(count=1), metadata=as_client("alice")
        )
    code, output = await asyncio.to_thread(terminate, first)
    assert code == 0, output

    second = start(control_process_factory, database_url)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = reservations_stub(channel)
        listed = await stub.ListReservations(
            rpb.ListReservationsRequest(), metadata=as_client("alice")
        )
        assert [r.id for r in listed.reservations] == [granted.reservation.id]
        (kept,) = listed.reservations
        assert kept.state == types_pb2.RESERVATION_STATE_ACTIVE
        assert [d.id for d in kept.devices] == [d.id for d in granted.reservation.devices]
        assert kept.end_time == granted.reservation.end_time
        availability = await stub.GetAvailability(rpb.GetAvailabilityRequest())
        assert availability.count == 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Reserve(rpb.ReserveRequest(count=1), metadata=as_client("bob"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# Start-up failures are one line and an exit code, never a traceback.


def test_a_taken_port_is_a_one_line_error_and_exit_1(
    tmp_path: Path, control_process_factory: list[ControlProcess]
) -> None:
    first = start(control_process_factory, sqlite_url(tmp_path, "first.db"))
    result = run(
        CONTROL,
        "serve",
        "--listen",
        first.address,
        "--database",
        sqlite_url(tmp_path, "second.db"),
        "--log-format",
        "json",
    )
    assert result.returncode == 1, result.output
    complaints = [line for line in result.output.splitlines() if "cannot listen" in line]
    assert len(complaints) == 1, result.output
    assert complaints[0].startswith(f"icefarm-control: cannot listen on {first.address}")
    assert "Traceback" not in result.output
    assert first.process.poll() is None


def assert_one_line_error(result: Finished, *named: str, code: int = 2) -> None:
    """A bad setting exits 2 (as in every command); a failure to run exits 1."""
    assert result.returncode == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("icefarm-control: ")
    for name in named:
        assert name in lines[0]


def test_a_bad_duration_flag_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    result = run(CONTROL, "serve", "--database", sqlite_url(tmp_path), "--default-lease", "banana")
    assert_one_line_error(result, "--default-lease", "banana")


def test_an_unknown_key_in_the_config_file_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "control.toml"
    config.write_text('listen = "127.0.0.1:0"\ncolour = "blue"\n')
    result = run(CONTROL, "serve", "--database", sqlite_url(tmp_path), "--config", str(config))
    assert_one_line_error(result, "colour", str(config))


def test_a_bad_environment_variable_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    result = run(
        CONTROL, "serve", "--database", sqlite_url(tmp_path), env={"ICEFARM_LOG_FORMAT": "xml"}
    )
    assert_one_line_error(result, "ICEFARM_LOG_FORMAT")


def test_a_short_token_key_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    result = run(
        CONTROL, "serve", "--database", sqlite_url(tmp_path), env={"ICEFARM_TOKEN_KEY": "short"}
    )
    assert_one_line_error(result, "ICEFARM_TOKEN_KEY")


def test_an_unreachable_database_is_a_one_line_error_and_exit_1() -> None:
    result = run(
        CONTROL,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database",
        "postgresql://postgres@127.0.0.1:1/nowhere",
    )
    assert_one_line_error(result, "cannot use the database", code=1)


def test_an_unknown_icefarm_variable_is_warned_about_naming_the_closest_setting(
    tmp_path: Path,
) -> None:
    result = run(
        CONTROL, "db", "upgrade", "--database", sqlite_url(tmp_path),
        env={"ICEFARM_OFLINE_TIMEOUT": "3s", "ICEFARM_CONTROL": "x:1", "ICEFARM_WORKER_NAME": "a"},
    )  # fmt: skip
    assert result.returncode == 0, result.output
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert warnings == [
        "icefarm-control: warning: unknown environment variable ICEFARM_OFLINE_TIMEOUT "
        "(did you mean ICEFARM_OFFLINE_TIMEOUT?): ignored"
    ]


def test_serve_help_shows_each_settings_default_as_written() -> None:
    result = run(CONTROL, "serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.output.split())
    assert "(default: 30s) [ICEFARM_OFFLINE_TIMEOUT]" in text
    assert "(default: 5m) [ICEFARM_WORKER_GRACE]" in text
    assert "(default: 1h) [ICEFARM_DEFAULT_LEASE]" in text


def test_db_commands_list_only_the_settings_they_use() -> None:
    result = run(CONTROL, "db", "upgrade", "--help")
    assert result.returncode == 0
    assert "--database" in result.output and "--log-level" in result.output
    assert "--listen" not in result.output and "--offline-timeout" not in result.output


def test_an_unknown_flag_is_a_usage_error_with_exit_2() -> None:
    result = run(CONTROL, "serve", "--no-such-flag")
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "--no-such-flag" in result.stderr
    assert "Traceback" not in result.output


async def test_a_flag_beats_the_environment_which_beats_the_config_file(
    tmp_path: Path, control_process_factory: list[ControlProcess]
) -> None:
    url = sqlite_url(tmp_path)
    await seed(url, boards=1)
    config = tmp_path / "control.toml"
    config.write_text('listen = "127.0.0.1:1"\nshutdown_grace = "7s"\ndefault_lease = "7m"\n')
    # start_control_process passes --listen 127.0.0.1:0 on the command line.
    control = start(
        control_process_factory,
        url,
        env={
            "ICEFARM_CONFIG": str(config),
            "ICEFARM_LISTEN": "127.0.0.1:2",
            "ICEFARM_SHUTDOWN_GRACE": "3s",
        },
    )
    async with grpc.aio.insecure_channel(control.address) as channel:
        granted = await reservations_stub(channel).Reserve(
            rpb.ReserveRequest(count=1), metadata=as_client("alice")
        )
    code, output = await asyncio.to_thread(terminate, control)
    assert code == 0, output
    records = log_records(output)
    serving = next(r for r in records if r.get("event") == "control serving")
    assert serving["listen"] == "127.0.0.1:0"  # flag > environment > file
    shutting_down = next(r for r in records if r.get("event") == "shutting down")
    assert shutting_down["grace"] == 3.0  # environment > file
    reservation = granted.reservation
    lease = reservation.end_time.ToSeconds() - reservation.create_time.ToSeconds()
    assert abs(lease - 7 * 60) <= 1  # file > default


# Help and the database commands.


def test_help_exits_0_and_names_the_commands() -> None:
    result = run(CONTROL, "--help")
    assert result.returncode == 0, result.output
    for command in ("serve", "db"):
        assert command in result.stdout


def test_serve_help_documents_every_setting_with_its_flag_and_environment_variable() -> None:
    result = run(CONTROL, "serve", "--help")
    assert result.returncode == 0, result.output
    assert "--config" in result.stdout and "ICEFARM_CONFIG" in result.stdout
    for setting in SETTINGS:
        assert setting.flag in result.stdout
        assert setting.env in result.stdout


async def test_db_upgrade_creates_the_schema_prints_the_revision_and_is_idempotent(
    database_url: str,
) -> None:
    typed_url = short_form(database_url)
    expected = f"database revision {head_revision()}"

    first = await asyncio.to_thread(run, CONTROL, "db", "upgrade", "--database", typed_url)
    assert first.returncode == 0, first.output
    assert expected in first.stdout
    assert await table_names(database_url) >= SCHEMA_TABLES

    second = await asyncio.to_thread(run, CONTROL, "db", "upgrade", "--database", typed_url)
    assert second.returncode == 0, second.output
    assert second.stdout == first.stdout

    current = await asyncio.to_thread(run, CONTROL, "db", "current", "--database", typed_url)
    assert current.returncode == 0, current.output
    assert current.stdout == first.stdout


async def test_sigterm_ends_the_operator_feed_with_unavailable_at_once(
    tmp_path: Path, control_process_factory: list[ControlProcess]
) -> None:
    control = start(control_process_factory, sqlite_url(tmp_path), "--shutdown-grace", "30s")
    async with grpc.aio.insecure_channel(control.address) as channel:
        feed = control_service_pb2_grpc.ControlServiceStub(channel).WatchEvents(
            cpb.WatchEventsRequest()
        )
        await asyncio.wait_for(feed.initial_metadata(), 10)
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        control.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(feed.read(), 20)
        # Told to go elsewhere straight away, not cut off when the 30 s grace runs out.
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason_of(caught.value) == "SHUTTING_DOWN"
        assert loop.time() - signalled < 10
    code, output = await asyncio.to_thread(finish, control)
    assert code == 0, output
