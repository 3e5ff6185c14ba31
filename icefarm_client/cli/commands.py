"""The CLI's commands about the farm and reservations (one function per subcommand)."""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
from collections import Counter
from pathlib import Path

from icefarm.settings import format_duration
from icefarm_client.cli.output import json_line, print_json, table, when
from icefarm_client.errors import IcefarmError
from icefarm_client.models import DeviceState, Event, EventType, Reservation
from icefarm_client.sync import Client

# A waiting Reserve not answered within this is in the queue: the CLI says so.
QUEUED_AFTER = 0.5


def status(client: Client, args: argparse.Namespace) -> int:
    """Workers, devices by state, and what this client holds."""
    workers = client.workers()
    devices = client.devices()
    mine = client.reservations()
    states = Counter(d.state.value for d in devices)
    summary = {
        "control": client.aio.settings.control,
        "client_id": client.client_id,
        "workers": len(workers),
        "workers_online": sum(w.state.value == "ONLINE" for w in workers),
        "devices": len(devices),
        "devices_by_state": dict(sorted(states.items())),
        "available": states.get(DeviceState.AVAILABLE.value, 0),
        "my_reservations": len(mine),
    }
    if args.json:
        print_json(summary)
        return 0
    print(f"control   {summary['control']} (as {summary['client_id']})")
    print(f"workers   {len(workers)} ({summary['workers_online']} online)")
    by_state = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none"
    print(f"devices   {len(devices)}: {by_state}")
    print(f"mine      {len(mine)} active reservation(s)")
    return 0


def workers(client: Client, args: argparse.Namespace) -> int:
    """Every worker."""
    found = client.workers()
    if args.json:
        print_json(found)
        return 0
    rows = [
        (
            w.name,
            w.endpoint,
            w.state.value,
            w.device_count,
            ",".join(w.modes),
            when(w.last_seen_time),
        )
        for w in found
    ]
    table(("NAME", "ENDPOINT", "STATE", "DEVICES", "MODES", "LAST SEEN"), rows)
    return 0


def devices(client: Client, args: argparse.Namespace) -> int:
    """Devices matching a selector."""
    state = DeviceState(args.state.upper()) if args.state else None
    found = client.devices(args.selector, state)
    if args.json:
        print_json(found)
        return 0
    rows = [(d.id, d.worker, d.kind, d.state.value, d.holder, d.error) for d in found]
    table(("ID", "WORKER", "KIND", "STATE", "HOLDER", "ERROR"), rows)
    return 0


def _print_reservations(found: list[Reservation], as_json: bool) -> None:
    if as_json:
        print_json(found)
        return
    rows = [
        (
            r.id,
            r.state.value,
            r.mode or "-",
            len(r.devices),
            ",".join(r.device_ids),
            when(r.end_time),
            r.end_reason.value if r.end_reason.value != "UNSPECIFIED" else "",
        )
        for r in found
    ]
    table(("ID", "STATE", "MODE", "N", "DEVICES", "LEASE END", "ENDED"), rows)


def reserve(client: Client, args: argparse.Namespace) -> int:
    """Reserve and return: held until the lease ends or `icefarm release`."""
    wanted = len(args.device) if args.device else args.count
    queued = None
    if args.wait and not args.json:
        # Not granted at once: the request waits in the control's queue; say so.
        queued = threading.Timer(QUEUED_AFTER, _say_queued, (client, args, wanted))
        queued.daemon = True
        queued.start()
    try:
        reservation = client.create_reservation(
            args.count if not args.device else 0,
            mode=args.mode,
            selector=args.selector,
            device_ids=args.device or (),
            duration=args.duration,
            wait=args.wait,
        )
    finally:
        if queued is not None:
            queued.cancel()
    if args.json:
        print_json(reservation)
        return 0
    print(f"reserved {reservation.id}: {len(reservation.devices)} device(s) until "
          f"{when(reservation.end_time)}")  # fmt: skip
    table(
        ("DEVICE", "WORKER", "ENDPOINT", "STATE"),
        [(d.id, d.worker, d.worker_endpoint, d.state.value) for d in reservation.devices],
    )
    print(f"release with: {_as_typed(args, 'release', reservation.id)}")
    return 0


def _say_queued(client: Client, args: argparse.Namespace, wanted: int) -> None:
    try:
        free = client.availability(args.selector).count
    except IcefarmError:
        free = None
    now = "" if free is None else f" ({free} free now)"
    print(
        f"queued: waiting up to {format_duration(args.wait)} for {wanted} device(s){now}",
        file=sys.stderr,
        flush=True,
    )


def _as_typed(args: argparse.Namespace, *words: str) -> str:
    """An `icefarm` command line that reaches the same control as the same client, for a hint
    to print (the flags given on this command line are repeated)."""
    typed = sys.argv[0] if sys.argv and Path(sys.argv[0]).name == "icefarm" else "icefarm"
    line = [typed, *words]
    if getattr(args, "control", None):
        line += ["--control", args.control]
    if getattr(args, "client_id", None):
        line += ["--client-id", args.client_id]
    return " ".join(shlex.quote(word) for word in line)


def extend(client: Client, args: argparse.Namespace) -> int:
    """Extend some or all of this client's reservations."""
    if args.all or not args.ids:
        found = client.extend_all(args.duration)
    else:
        found = client.extend(*args.ids, duration=args.duration)
    _print_reservations(found, args.json)
    return 0


def release(client: Client, args: argparse.Namespace) -> int:
    """Release some or all of this client's reservations."""
    released = (
        client.release_all() if args.all else client.release(*args.ids, device_ids=args.device)
    )
    if args.json:
        print_json(released)
        return 0
    print(f"released {len(released.device_ids)} device(s); "
          f"ended {len(released.ended_reservation_ids)} reservation(s)")  # fmt: skip
    return 0


def reservations(client: Client, args: argparse.Namespace) -> int:
    """This client's reservations."""
    _print_reservations(client.reservations(include_ended=args.all), args.json)
    return 0


def describe(event: Event) -> str:
    """One line for an event."""
    parts = [event.type.value]
    if event.worker:
        parts.append(f"worker={event.worker}")
    if event.reservation_id:
        parts.append(f"reservation={event.reservation_id}")
    if event.device is not None:
        parts.append(f"device={event.device.id} state={event.device.state.value}")
    elif event.device_ids:
        parts.append("devices=" + ",".join(event.device_ids))
    if event.worker_info is not None:
        parts.append(f"state={event.worker_info.state.value}")
    if event.reason.value != "UNSPECIFIED":
        parts.append(f"reason={event.reason.value}")
    if event.client_id:
        parts.append(f"client={event.client_id}")
    if event.type is EventType.RESERVATION_EXTENDED or event.end_time:
        parts.append(f"until={when(event.end_time)}")
    if event.error:
        parts.append(f"error={event.error!r}")
    return " ".join(parts)


def watch(client: Client, args: argparse.Namespace) -> int:
    """The operator feed, live, one line (or one JSON object) per event."""
    for seen, event in enumerate(client.watch_events(args.resume_after), start=1):
        if args.json:
            print_json_line(event)
        else:
            print(f"{event.sequence:>6} {when(event.time)} {describe(event)}", flush=True)
        if args.limit and seen >= args.limit:
            break
    return 0


def print_json_line(value: object) -> None:
    """One compact JSON object per line (for feeds), flushed."""
    print(json_line(value), flush=True)
