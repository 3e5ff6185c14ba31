"""The soak's report: faults by kind, counts, failures by reason, recovery p50/p99 per fault
kind against its target, max RSS per process, each invariant's verdict; as text or JSON. A
failing run names its seed and the first broken invariant with what happened around it."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any

from tests.soak.faults import FaultRecord
from tests.soak.monitor import Break
from tests.soak.run import Outcome

# The targets (seconds), by fault kind.
TARGETS = {
    "control-kill": 10.0,
    "postgresql-restart": 15.0,
    "worker-kill": 10.0,
    "board-hang": 5.0,
    "board-short-read": 5.0,
    "board-unplug": 5.0,
    "board-slow": 5.0,
    "board-flash-failure": 5.0,
}
RERUN_KINDS = {"board-hang", "board-short-read", "board-unplug"}
AROUND = 5.0
# A rerun result counts as the fault's only within this many seconds of it.
RERUN_WINDOW = 30.0


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def board_recoveries(outcome: Outcome) -> None:
    """Fill in the board faults' recovery from the clients' logs and the simulators' records
    of when each fault fired. A hang, short read or slow answer is injected to fire at the
    board's next evaluation, so it counts from then (`fired.jsonl`), for whoever held the board
    then: until that holder's next rerun result (attempt >= 2, on any board), or for a slow
    board its next result from that board. An unplug counts from the unplug, for the holder
    at that moment. A fault with nothing to rerun (it never fired; the holder had no other
    board and was told DeviceFailed) is said so in `how` instead of measured."""
    results = sorted(
        ((r["t"], life, r) for life, r in outcome.seen.records("result")), key=lambda x: x[0]
    )
    errors = sorted(
        ((r["t"], life, r) for life, r in outcome.seen.records("error")), key=lambda x: x[0]
    )
    firings = sorted(outcome.firings, key=lambda f: float(f["t"]))
    grants = sorted(
        ((r["t"], life, r) for life, r in outcome.seen.records("granted")), key=lambda x: x[0]
    )
    for record in outcome.records:
        if record.kind not in RERUN_KINDS | {"board-slow"} or not record.holder:
            continue
        start = record.t
        _, index, number = record.holder.split("-")
        holder = (int(index), int(number))
        if record.kind != "board-unplug":
            fired = next(
                (f for f in firings if f["device"] == record.target and f["t"] >= record.t), None
            )
            if fired is None:
                record.how = "never fired: the board evaluated nothing more"
                continue
            start = float(fired["t"])
            record.extra["fired_after_injection"] = round(start - record.t, 2)
            # Whoever was granted the board last before it fired was evaluating on it.
            granted = [
                (life.index, life.life)
                for t, life, r in grants
                if t <= start and record.target in r.get("devices", [])
            ]
            holder = granted[-1] if granted else holder
        for t, life, r in results:
            if t < start:
                continue
            if t - start > RERUN_WINDOW:
                break  # later results are other bitstreams' business
            if (life.index, life.life) != holder:
                continue
            if record.kind == "board-slow" and r["device"] == record.target:
                # Its own answer, not one that was already on its way when it fired.
                if t - float(r.get("run", 0.0)) >= start - 0.05:
                    record.recovery = t - start
                    break
                continue
            if record.kind != "board-slow" and r["attempt"] >= 2:
                record.recovery = t - start
                break
        if record.recovery is None and record.kind != "board-slow":
            told = next(
                (
                    (t, r)
                    for t, life, r in errors
                    if (life.index, life.life) == holder and 0 <= t - start <= RERUN_WINDOW
                ),
                None,
            )
            if told is not None:
                record.how = (
                    f"nothing to rerun on (no other board): told {told[1]['error'][:40]!r} "
                    f"after {told[0] - start:.2f} s"
                )


def _reason(error: str) -> str:
    """A failure's reason without the ids in it, so like failures count together."""
    return re.sub(r"\b(w\d+-\d+|soak-\d+[.\d]*|[0-9a-f]{8,}|\d+)\b", "#", error)[:90]


def summarise(outcome: Outcome) -> dict[str, Any]:
    board_recoveries(outcome)
    seen = outcome.seen
    results = [r for _, r in seen.records("result")]
    failed = Counter(_reason(r["error"]) for r in results if r["error"])
    errors = Counter(_reason(r["error"]) for _, r in seen.records("error"))
    refused = Counter(r["error"] for _, r in seen.records("refused"))
    by_kind: dict[str, list[FaultRecord]] = {}
    for record in outcome.records:
        by_kind.setdefault(record.kind, []).append(record)
    recovery = {}
    for kind, records in sorted(by_kind.items()):
        values = [r.recovery for r in records if r.recovery is not None]
        entry: dict[str, Any] = {
            "faults": len(records),
            "measured": len(values),
            "not_acted_out": [r.error for r in records if r.error],
            "not_measured": [r.how for r in records if r.recovery is None and r.how],
        }
        if values:
            entry["p50"] = round(percentile(values, 0.5), 2)
            entry["p99"] = round(percentile(values, 0.99), 2)
        if kind in TARGETS:
            entry["target"] = TARGETS[kind]
            entry["meets_target"] = bool(values) and entry["p99"] < TARGETS[kind]
        recovery[kind] = entry
    verdicts = {name: ("PASS" if not found else "FAIL") for name, found in outcome.breaks.items()}
    first = _first_break(outcome)
    return {
        "seed": outcome.options.seed,
        "backend": outcome.options.backend,
        "replicas": outcome.options.sizes.replicas,
        "workers": outcome.options.sizes.workers,
        "boards_per_worker": outcome.options.sizes.boards,
        "clients": outcome.options.sizes.clients,
        "seconds": outcome.options.seconds,
        "wall_seconds": round(outcome.wall, 1),
        "network_cut": outcome.network_cut,
        "faults_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
        "reservations_granted": len(seen.records("granted")),
        "reservations_in_database": len(outcome.reservations),
        "reserves_refused": dict(refused),
        "experiments_failed_by_reason": dict(errors.most_common()),
        "bitstreams_submitted": len(seen.records("submit")),
        "results": len(results),
        "results_ok": sum(1 for r in results if not r["error"]),
        "results_failed_by_reason": dict(failed.most_common()),
        "client_crashes": [r["error"] for _, r in seen.records("crash")],
        "invariant_checks": outcome.monitor.checks,
        "invariant_checks_skipped_database_down": outcome.monitor.skipped,
        "recovery_seconds": recovery,
        "max_rss_mib": {k: round(v / 1024, 1) for k, v in sorted(outcome.rss_peak.items())},
        "invariants": verdicts,
        "broken": {
            name: [b.detail for b in found[:5]] for name, found in outcome.breaks.items() if found
        },
        "first_break": first,
        "passed": all(v == "PASS" for v in verdicts.values()),
    }


def _first_break(outcome: Outcome) -> dict[str, Any] | None:
    found: list[tuple[float, str, Break]] = [
        (b.t, name, b) for name, breaks in outcome.breaks.items() for b in breaks
    ]
    if not found:
        return None
    # Breaks judged at the end (t = 0) come after every break seen while running.
    t, name, brk = min(found, key=lambda item: (item[0] == 0, item[0]))
    changes = [c for c in outcome.monitor.changes if c[1] in brk.devices]
    if changes:
        t = changes[-1][0]  # a stuck board: when it went into the state it stuck in
    elif not t:
        t = max((when for when, _ in outcome.monitor.notes), default=0.0)
    around = [f"{when - t:+.1f}s board {device}: {state}" for when, device, state in changes[-20:]]
    around += [
        f"{when - t:+.1f}s soak: {text}"
        for when, text in outcome.monitor.notes
        if abs(when - t) <= 30
    ]
    around += [
        f"{r['t'] - t:+.1f}s soak-{life.index}: {r['kind']} "
        + json.dumps({k: v for k, v in r.items() if k not in ("t", "kind")})[:160]
        for life in outcome.seen.lives
        for r in life.records
        if t and abs(r["t"] - t) <= AROUND and r["kind"] not in ("submit", "wire")
    ]
    story = sorted(around, key=_offset)[:60]
    return {"invariant": name, "detail": brk.detail, "t": t, "around": story}


def _offset(line: str) -> float:
    """The seconds an "around" line starts with ("+1.5s ...")."""
    return float(line.split("s", 1)[0])


def text(summary: dict[str, Any]) -> str:
    lines = [
        f"soak seed {summary['seed']}: {summary['backend']}, {summary['replicas']} replica(s), "
        f"{summary['workers']} workers x {summary['boards_per_worker']} boards, "
        f"{summary['clients']} clients, {summary['seconds']:.0f} s of faults "
        f"({summary['wall_seconds']} s wall); network cut by {summary['network_cut']}",
        "",
        "faults injected: " + ", ".join(f"{k} {v}" for k, v in summary["faults_by_kind"].items()),
        f"reservations granted {summary['reservations_granted']} "
        f"(rows in the database {summary['reservations_in_database']}); "
        f"reserves refused {summary['reserves_refused']}",
        f"bitstreams submitted {summary['bitstreams_submitted']}, results "
        f"{summary['results']} ({summary['results_ok']} ok)",
        f"failed results by reason: {summary['results_failed_by_reason'] or 'none'}",
        f"experiments ended by an error: {summary['experiments_failed_by_reason'] or 'none'}",
        f"invariant checks {summary['invariant_checks']} "
        f"(skipped while the database was down: "
        f"{summary['invariant_checks_skipped_database_down']})",
        "",
        f"{'recovery (s)':22} {'n':>3} {'p50':>7} {'p99':>7} {'target':>7}",
    ]
    for kind, entry in summary["recovery_seconds"].items():
        target = entry.get("target")
        verdict = "" if target is None else ("  ok" if entry["meets_target"] else "  MISSED")
        lines.append(
            f"{kind:22} {entry['measured']:>3} {entry.get('p50', '-'):>7} "
            f"{entry.get('p99', '-'):>7} {target if target is not None else '-':>7}{verdict}"
        )
        if entry["not_acted_out"]:
            lines.append(f"{'':22} not acted out: {entry['not_acted_out']}")
        for how in entry["not_measured"]:
            lines.append(f"{'':22} not measured: {how}")
    lines += [
        "",
        "max RSS (MiB): " + ", ".join(f"{k} {v}" for k, v in summary["max_rss_mib"].items()),
    ]
    lines += ["", "invariants:"]
    lines += [f"  {verdict}  {name}" for name, verdict in summary["invariants"].items()]
    for name, details in summary["broken"].items():
        lines.append(f"  broken: {name}: {details}")
    if summary["first_break"]:
        first = summary["first_break"]
        lines += [
            "",
            f"FAILED (seed {summary['seed']}): first broken invariant: {first['invariant']}",
            f"  {first['detail']}",
            "  around it:",
            *(f"    {line}" for line in first["around"]),
        ]
    else:
        lines += ["", f"PASSED (seed {summary['seed']})"]
    return "\n".join(lines)
