"""The invariants judged from what every client saw (their JSON lines) and from the database at
the end. Each check returns the breaks it found, each with a time, so the report can show the
first one with the events around it."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icefarm_worker.simulator.firmware import expected_pulse_count, expected_variance
from tests.soak.experiment import bitstream_data
from tests.soak.monitor import Break

# What a reservation's end reason may be when its client did not release it itself.
NOT_RELEASED_REASONS = {"CLIENT_LOST", "WORKER_LOST", "EXPIRED", "REVOKED", "DEVICE_REMOVED"}
# Memory: a process's RSS in the last quarter of its life may exceed its second quarter by
# at most this much (the first quarter is warm-up: caches, pools, imports).
RSS_GROWTH_FRACTION = 0.25
RSS_GROWTH_FLOOR_KIB = 20 * 1024


@dataclass
class Life:
    """One client process's records."""

    index: int
    life: int
    records: list[dict[str, Any]]
    killed_at: float | None = None


@dataclass
class Seen:
    lives: list[Life] = field(default_factory=list)

    @classmethod
    def read(cls, directory: Path, kills: dict[tuple[int, int], float]) -> Seen:
        seen = cls()
        for path in sorted(directory.glob("client-*.jsonl")):
            _, index, life = path.stem.split("-")
            records = []
            for line in path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # the line a SIGKILL cut short
            key = (int(index), int(life))
            seen.lives.append(Life(int(index), int(life), records, kills.get(key)))
        return seen

    def records(self, kind: str) -> list[tuple[Life, dict[str, Any]]]:
        return [(life, r) for life in self.lives for r in life.records if r["kind"] == kind]


def _matches(mode: str, data: bytes, record: dict[str, Any]) -> bool:
    if mode == "pulsecount":
        return bool(record.get("pulse_count") == expected_pulse_count(data))
    variance = record.get("variance")
    return variance is not None and math.isclose(variance, expected_variance(data), rel_tol=1e-9)


def check_results(seen: Seen) -> list[Break]:
    """Every bitstream submitted got exactly one result: a value matching the simulator's
    function, or a failure with a reason (a failed result, or the experiment's error for
    what was pending when it failed). Early-ended experiments owe nothing for what they left;
    a killed client's last experiment owes nothing."""
    breaks: list[Break] = []
    for life in seen.lives:
        modes: dict[str, str] = {}
        submitted_at: dict[str, float] = {}
        results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        settled: set[str] = set()
        for r in life.records:
            if r["kind"] == "submit":
                modes[r["id"]] = r["mode"]
                submitted_at[r["id"]] = r["t"]
            elif r["kind"] == "result":
                results[r["id"]].append(r)
            elif r["kind"] == "end":
                # Left by ending early, or failed with the experiment's error as the reason.
                settled.update(r["pending"])
        ended_exps = {r["exp"] for r in life.records if r["kind"] == "end"}
        for bitstream_id, mode in modes.items():
            got = results.get(bitstream_id, [])
            exp = int(bitstream_id.rsplit(".", 2)[-2])
            if len(got) > 1:
                breaks.append(
                    Break(got[1]["t"], "bitstream got more than one result", bitstream_id)
                )
                continue
            if not got:
                if bitstream_id not in settled and exp in ended_exps:
                    breaks.append(
                        Break(
                            submitted_at[bitstream_id], "bitstream without a result", bitstream_id
                        )
                    )
                continue
            result = got[0]
            if result["error"]:
                continue  # a failure with its reason
            if not _matches(mode, bitstream_data(bitstream_id), result):
                detail = f"{bitstream_id} on {result['device']}: {result}"
                breaks.append(Break(result["t"], "result does not match its bitstream", detail))
    return breaks


def check_sequences(seen: Seen) -> list[Break]:
    """No event lost or duplicated on any Session: the sequences that arrived on one client
    process's Session, across its reconnects, go up by exactly one each time."""
    breaks: list[Break] = []
    for life in seen.lives:
        last = 0
        for r in life.records:
            if r["kind"] != "wire" or not r["seq"]:
                continue
            seq = int(r["seq"])
            if last and seq <= last:
                detail = f"soak-{life.index} life {life.life}: {seq} after {last}"
                breaks.append(Break(r["t"], "Session event duplicated", detail))
            elif last and seq != last + 1:
                detail = f"soak-{life.index} life {life.life}: {seq} after {last}"
                breaks.append(Break(r["t"], "Session event lost (gap)", detail))
            last = max(last, seq)
    return breaks


def check_reservations(seen: Seen, rows: list[dict[str, Any]]) -> list[Break]:
    """Every reservation ended exactly once with a reason that matches what happened; no
    client was told "nothing held" while something was held for it."""
    breaks: list[Break] = []
    by_id = {r["id"]: r for r in rows}
    known: dict[str, set[str]] = defaultdict(set)
    for life, r in seen.records("granted") + seen.records("error"):
        if r.get("reservation"):
            known[f"soak-{life.index}-{life.life}"].add(r["reservation"])
    closed: dict[str, list[str]] = defaultdict(list)
    for _life, r in seen.records("event"):
        if r["type"] == "RESERVATION_ENDED" and r["closed"]:
            closed[r["reservation"]].append(r["reason"])
    for reservation_id, reasons in closed.items():
        if len(reasons) > 1:
            breaks.append(
                Break(0.0, "reservation ended more than once", f"{reservation_id}: {reasons}")
            )
        row = by_id.get(reservation_id)
        if row is not None and row["end_reason"] != reasons[0]:
            detail = f"{reservation_id}: told {reasons[0]}, recorded {row['end_reason']}"
            breaks.append(Break(0.0, "end reason told differs from the one recorded", detail))
    for _life, r in seen.records("released"):
        row = by_id.get(r["reservation"])
        if row and r["reservation"] in r["ended"] and row["end_reason"] != "RELEASED":
            detail = f"{r['reservation']}: released by its client, recorded {row['end_reason']}"
            breaks.append(Break(r["t"], "end reason does not match what happened", detail))
    for row in rows:
        if row["state"] != "ENDED" or not row["end_reason"]:
            detail = f"{row['id']} of {row['client_id']}: {row['state']} {row['end_reason']}"
            breaks.append(Break(0.0, "reservation not ended exactly once at the end", detail))
    breaks += _told_nothing_held(seen, rows, known)
    return breaks


def _told_nothing_held(
    seen: Seen, rows: list[dict[str, Any]], known: dict[str, set[str]]
) -> list[Break]:
    breaks: list[Break] = []
    for life, r in seen.records("refused"):
        if r["held"]:
            detail = f"soak-{life.index}-{life.life}: refused ({r['error']}) yet holds {r['held']}"
            breaks.append(Break(r["t"], "client told nothing held while something was", detail))
    # A reservation its client never heard of: only a killed client's last Reserve may leave
    # one (the process died between the grant and writing it down).
    killed = {f"soak-{life.index}-{life.life}": life for life in seen.lives if life.killed_at}
    for row in rows:
        client = row["client_id"]
        if not client.startswith("soak-") or row["id"] in known[client]:
            continue
        if client in killed and row["end_reason"] in NOT_RELEASED_REASONS | {"RELEASED"}:
            continue
        detail = f"{row['id']} of {client} ({row['end_reason']}) was never reported to it"
        breaks.append(Break(0.0, "client told nothing held while something was", detail))
    return breaks


def check_rss(rss: dict[str, list[tuple[float, int, int]]]) -> tuple[list[Break], dict[str, int]]:
    """Control and worker memory does not grow: per process (pid), the last quarter's median
    RSS is within the allowance of the second quarter's."""
    breaks: list[Break] = []
    peak: dict[str, int] = {}
    for role, samples in rss.items():
        peak[role] = max(kib for _, _, kib in samples)
        if not role.startswith(("control", "worker")):
            continue
        by_pid: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for t, pid, kib in samples:
            by_pid[pid].append((t, kib))
        for pid, series in by_pid.items():
            if len(series) < 8:
                continue  # too short a life to judge
            quarter = len(series) // 4
            early = statistics.median(k for _, k in series[quarter : 2 * quarter])
            late = statistics.median(k for _, k in series[3 * quarter :])
            allowed = max(early * RSS_GROWTH_FRACTION, RSS_GROWTH_FLOOR_KIB)
            if late - early > allowed:
                detail = f"{role} pid {pid}: {early / 1024:.0f} MiB -> {late / 1024:.0f} MiB"
                breaks.append(Break(series[-1][0], "memory grows over the run", detail))
    return breaks, peak
