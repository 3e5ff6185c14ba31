"""`icefarm demo`: a control on SQLite in a temporary directory, a worker with simulated
boards, and an experiment run through the client library — then everything stops cleanly."""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

from icefarm.limits import PICO2_ICE_BITSTREAM_BYTES
from icefarm_client.cli.experiment import RESULT_COLUMNS, result_row
from icefarm_client.cli.output import Progress, table
from icefarm_client.errors import IcefarmError
from icefarm_client.sync import Client
from icefarm_control.launch import start_control_process
from icefarm_worker.simulator.firmware import expected_pulse_count

BITSTREAM_SIZE = PICO2_ICE_BITSTREAM_BYTES
BIN = Path(sys.executable).parent


def demo_bitstream(seed: int) -> bytes:
    """A deterministic pseudo-random 104090-byte bitstream."""
    block = hashlib.sha256(f"icefarm-demo-{seed}".encode()).digest()
    return (block * (BITSTREAM_SIZE // len(block) + 1))[:BITSTREAM_SIZE]


def _start_worker(control: str, boards: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    command = [
        str(BIN / "icefarm-worker"), "run", "--control", control, "--simulate", str(boards),
        "--name", "demo-worker", "--listen", "127.0.0.1:0", "--log-format", "json",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "worker serving":
                return process, str(record["endpoint"])
        time.sleep(0.05)
    process.kill()
    raise IcefarmError(f"the worker did not start; see {log}")


def _stop(process: subprocess.Popen[bytes] | None, name: str) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        print(f"the {name} did not stop within 20 s; killing it", file=sys.stderr)
        process.kill()
        process.wait(timeout=10)


def _tool(name: str) -> str:
    """How to run one of this install's commands as typed in a shell here: its path in the
    environment the demo runs from (relative when under the current directory), since a venv
    made by `make demo` is not on PATH."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        return shlex.quote(found) if found else name
    try:
        return shlex.quote(str(path.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(path))


def _commands(address: str, keep_running: bool) -> None:
    icefarm, grpcurl = _tool("icefarm"), _tool("grpcurl")
    if not keep_running:
        print("\nTo keep the farm up and try the CLI and grpcurl on it, run:")
        print(f"  {icefarm} demo --keep-running")
        return
    print(f"\nThe control is at {address}. Try, in another terminal:")
    print(f"  {icefarm} --control {address} status")
    print(f"  {icefarm} --control {address} devices kind=pico2-ice")
    print(f"  {icefarm} --control {address} --client-id me reserve 2 --mode pulsecount")
    print(f"  {icefarm} --control {address} --client-id me reservations")
    print(f"  {icefarm} --control {address} --client-id me release --all")
    print(f"  {icefarm} --control {address} watch")
    print(f"  {grpcurl} -plaintext {address} list")
    print(f"  {grpcurl} -plaintext -d '{{}}' {address} icefarm.v1.ControlService/ListDevices")
    print(f"  {grpcurl} -plaintext -H 'icefarm-client-id: me' -d '{{\"count\": 1}}' {address} "
          "icefarm.v1.ReservationService/Reserve")  # fmt: skip


def _experiment(client: Client, args: argparse.Namespace) -> None:
    print(f"waiting until {args.boards} simulated boards are flashed, tested and available ...")
    client.wait_available(args.boards, "kind=pico2-ice", timeout=timedelta(seconds=60))
    print(f"reserving {args.count} boards in pulsecount mode ...")
    bitstreams = {str(i): demo_bitstream(i) for i in range(args.bitstreams)}
    with client.reserve(args.count, mode="pulsecount") as farm:
        print(f"reservation {farm.id}: " + ", ".join(d.id for d in farm.devices))
        progress = Progress(len(bitstreams), "evaluating ")
        results = []
        started = time.monotonic()
        for result in farm.evaluate(bitstreams.items()):
            results.append(result)
            progress.advance(failed=not result.ok)
        progress.close()
        elapsed = time.monotonic() - started
    results.sort(key=lambda r: int(r.bitstream_id))
    table([c.upper() for c in RESULT_COLUMNS] + ["CHECK"], [
        (*result_row(r), "✓" if r.pulse_count == expected_pulse_count(bitstreams[r.bitstream_id])
         else "✗")
        for r in results
    ])  # fmt: skip
    good = sum(r.pulse_count == expected_pulse_count(bitstreams[r.bitstream_id]) for r in results)
    print(f"\n✓ {good}/{len(bitstreams)} results match the simulator's expected pulse count "
          f"({elapsed:.1f} s on {args.count} boards); reservation released")  # fmt: skip
    if good != len(bitstreams):
        raise IcefarmError(f"{len(bitstreams) - good} results were wrong or missing")


def run_demo(args: argparse.Namespace) -> int:
    """Start the farm, run the experiment, print how to poke at it, stop everything."""
    control: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="icefarm-demo-") as tmp:
        root = Path(tmp)
        try:
            print(f"starting a control on SQLite in {root} ...")
            try:
                control, address = start_control_process(
                    f"sqlite:///{root / 'control.db'}", root / "control.log"
                )
            except RuntimeError as exc:
                raise IcefarmError(str(exc)) from None
            print(f"starting a worker with {args.boards} simulated boards ...")
            worker, _ = _start_worker(address, args.boards, root / "worker.log")
            with Client(address, client_id="demo") as client:
                _experiment(client, args)
            _commands(address, args.keep_running)
            if args.keep_running:
                print("\ncontrol and worker keep running; Ctrl-C stops them")
                threading.Event().wait()
        except KeyboardInterrupt:
            print("\nstopping ...")
        finally:
            _stop(worker, "worker")
            _stop(control, "control")
    print("stopped the worker and the control")
    return 0
