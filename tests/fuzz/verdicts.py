"""What a correct answer to a fuzz case looks like, and the tally of a run.

After each case: the status code is one the RPC may answer (never UNKNOWN; INTERNAL only as a
failure), the wire carries no exception text, SQL or traceback (status message, ErrorInfo and
BadRequest details, other trailers), and an INVALID_ARGUMENT says which field. The database
invariants (tests/invariants.py) are checked by the run loop (run.py).
"""

from __future__ import annotations

import builtins
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

from tests.fuzz.cases import Case
from tests.fuzz.execute import Outcome

C = grpc.StatusCode
# Every RPC may refuse bad input, a bad identity, or a request past gRPC's own size limits.
_ANY = frozenset({C.OK, C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.RESOURCE_EXHAUSTED})
_CHANGES = frozenset({C.NOT_FOUND, C.PERMISSION_DENIED, C.FAILED_PRECONDITION, C.ABORTED})
_WORKER = frozenset({C.NOT_FOUND, C.PERMISSION_DENIED, C.FAILED_PRECONDITION})

EXPECTED: dict[str, frozenset[grpc.StatusCode]] = {
    "ReservationService.Reserve": _ANY | _CHANGES | {C.DEADLINE_EXCEEDED},
    "ReservationService.Extend": _ANY | _CHANGES,
    "ReservationService.Release": _ANY | _CHANGES,
    "ReservationService.ListReservations": _ANY,
    "ReservationService.GetAvailability": _ANY,
    # ABORTED: superseded by a newer Session; DEADLINE_EXCEEDED: no Hello in time.
    "ReservationService.Session": _ANY | {C.ABORTED, C.DEADLINE_EXCEEDED},
    # ALREADY_EXISTS: a live session has the name; UNAVAILABLE: the session was replaced or
    # the worker went offline (register again); DEADLINE_EXCEEDED: no Register in time.
    "ControlService.WorkerSession": _ANY
    | _CHANGES
    | {C.ALREADY_EXISTS, C.UNAVAILABLE, C.DEADLINE_EXCEEDED},
    "ControlService.ListWorkers": _ANY,
    "ControlService.ListDevices": _ANY,
    "ControlService.GetDevice": _ANY | {C.NOT_FOUND},
    "ControlService.EndReservations": _ANY | _CHANGES,
    "ControlService.ExtendReservations": _ANY | _CHANGES,
    "ControlService.RemoveDevice": _ANY | _CHANGES,
    "ControlService.RebootDevice": _ANY | _CHANGES,
    "ControlService.DrainWorker": _ANY | _CHANGES,
    "ControlService.WatchEvents": _ANY,
    # DEADLINE_EXCEEDED: the fuzzer's own deadline on a long queue of full-size bitstreams.
    "WorkerService.Evaluate": _ANY | _WORKER | {C.DEADLINE_EXCEEDED},
    "WorkerService.SetMode": _ANY | _WORKER,
    "WorkerService.RebootDevice": _ANY | _WORKER,
    "WorkerService.Export": _ANY | _WORKER,
    "WorkerService.GetDeviceInfo": _ANY | _WORKER,
    # PERMISSION_DENIED: a caller that is not on loopback.
    "WorkerService.UpdateDevice": _ANY | {C.PERMISSION_DENIED},
}

# Text that only an exception, a driver or a query puts in a message.
_LEAKS_EXACT = ["SELECT ", "INSERT ", "UPDATE ", "DELETE FROM", "[SQL:", "Error(", "<class '"]
_LEAKS_EXACT += ['File "', "DecodeError", "IntegrityError", "OperationalError", "DataError"]
_LEAKS_EXACT += ["ProgrammingError", "DBAPIError", "StatementError", "InterfaceError"]
_LEAKS_EXACT += sorted(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)
_LEAKS_ANY_CASE = ["traceback", "sqlalchemy", "psycopg", "sqlite3"]


@dataclass(frozen=True)
class Failure:
    kind: str  # code | leak | hang | cut-off | bad-invalid-argument | invariant | fuzzer
    rpc: str
    code: str
    detail: str
    case: str

    @property
    def signature(self) -> tuple[str, str, str, bool]:
        """Failures with one signature are one defect (seen on one or more RPCs); bytes that
        do not decode and messages that do are told apart (they fail in different places)."""
        return (self.kind, self.code, _normalise(self.detail), "[raw]" in self.case)


def _normalise(text: str) -> str:
    text = re.sub(r"icefarm\.v1\.\w+", "<message>", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"[0-9a-f]{8,}|\d+", "#", text)
    return text[:90]


def wire_text(outcome: Outcome) -> list[str]:
    """Every piece of text the server put on the wire with its status."""
    texts = [outcome.details]
    for key, value in outcome.trailing:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            texts.extend(_status_texts(value))
        elif isinstance(value, str):
            texts.append(value)
    return texts


def _status_texts(blob: bytes) -> list[str]:
    try:
        status = status_pb2.Status.FromString(blob)
    except Exception:
        return [repr(blob)]
    texts = [status.message]
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            texts.extend([info.reason, info.domain, *info.metadata.keys(), *info.metadata.values()])
        elif detail.Unpack(bad):
            for v in bad.field_violations:
                texts.extend([v.field, v.description])
        else:
            texts.append(str(detail))
    return texts


def _details(outcome: Outcome) -> tuple[list[error_details_pb2.ErrorInfo], list[str]]:
    infos: list[error_details_pb2.ErrorInfo] = []
    fields: list[str] = []
    for key, value in outcome.trailing:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:
            continue
        for detail in status.details:
            info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
            if detail.Unpack(info):
                infos.append(info)
            elif detail.Unpack(bad):
                fields.extend(v.field for v in bad.field_violations)
    return infos, fields


def leaks(case: Case, outcome: Outcome) -> list[str]:
    """Exception text on the wire that is not just the request quoted back."""
    sent = case.strings()
    found = []
    for text in wire_text(outcome):
        lowered = text.lower()
        for word in _LEAKS_EXACT:
            if word in text and not any(word in s for s in sent):
                found.append(word)
        for word in _LEAKS_ANY_CASE:
            if word in lowered and not any(word in s.lower() for s in sent):
                found.append(word)
    return sorted(set(found))


# How a registered worker's stream may end: by the worker, by a newer session or going
# offline (register again), or by gRPC's own limits.
_WORKER_STREAM_ENDS = frozenset({C.OK, C.UNAVAILABLE, C.RESOURCE_EXHAUSTED})


def _worker_cut_off(case: Case, outcome: Outcome) -> bool:
    """A registered worker's stream ended because of one of its messages: a refused report
    must be refused alone (logged), never cut off a worker that runs many boards."""
    if case.rpc.key != "ControlService.WorkerSession" or case.raw is not None:
        return False
    registered = any(
        getattr(r, "WhichOneof", lambda _: None)("kind") == "registered" for r in outcome.responses
    )
    return registered and outcome.code not in _WORKER_STREAM_ENDS


def judge(case: Case, outcome: Outcome) -> list[Failure]:
    """What is wrong with how the server answered `case` (nothing, for a correct answer)."""
    rpc, code = case.rpc.key, outcome.code.name
    described = case.describe()
    problems: list[Failure] = []
    if outcome.code not in EXPECTED[rpc]:
        problems.append(Failure("code", rpc, code, outcome.details[:300], described))
    words = leaks(case, outcome)
    if words:
        text = " / ".join(t for t in wire_text(outcome) if t)[:300]
        problems.append(Failure("leak", rpc, code, f"{words}: {text}", described))
    if outcome.closed_by_fuzzer and case.must_end():
        problems.append(
            Failure("hang", rpc, "-", "the stream was neither answered nor ended", described)
        )
    if _worker_cut_off(case, outcome):
        problems.append(Failure("cut-off", rpc, code, outcome.details[:300], described))
    if outcome.code == C.INVALID_ARGUMENT:
        infos, fields = _details(outcome)
        reasons = {i.reason for i in infos}
        if not infos or ("INVALID_FIELD" in reasons and not any(fields)):
            problems.append(
                Failure("bad-invalid-argument", rpc, code, outcome.details[:300], described)
            )
    return problems


@dataclass
class Tally:
    """Counts of one run, and the failures found."""

    cases: Counter[str] = field(default_factory=Counter)
    codes: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    origins: Counter[str] = field(default_factory=Counter)
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    failures: list[Failure] = field(default_factory=list)
    invariant_breaks: int = 0
    unsendable: int = 0

    def record(
        self, case: Case, outcome: Outcome, problems: list[Failure], seconds: float = 0.0
    ) -> None:
        self.seconds[case.rpc.key] += seconds
        if outcome.unsendable:
            self.unsendable += 1
            return
        self.cases[case.rpc.key] += 1
        self.origins[case.origin] += 1
        self.codes[case.rpc.key][outcome.code.name] += 1
        self.failures.extend(problems)
        self.invariant_breaks += sum(1 for p in problems if p.kind == "invariant")

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def count(self, code: str) -> int:
        return sum(c[code] for c in self.codes.values())

    def distinct(self) -> list[tuple[Failure, list[str], int]]:
        """One entry per defect: the failure with the shortest case (the minimal repro), the
        RPCs it was seen on and how many cases showed it."""
        best: dict[tuple[str, str, str, bool], Failure] = {}
        rpcs: defaultdict[tuple[str, str, str, bool], set[str]] = defaultdict(set)
        seen: Counter[tuple[str, str, str, bool]] = Counter()
        for failure in self.failures:
            key = failure.signature
            rpcs[key].add(failure.rpc)
            seen[key] += 1
            known = best.get(key)
            if known is None or len(failure.case) < len(known.case):
                best[key] = failure
        found = [(f, sorted(rpcs[k]), seen[k]) for k, f in best.items()]
        return sorted(found, key=lambda item: (item[0].kind, item[0].code, item[0].rpc))

    def report(self, title: str, show: int = 12) -> str:
        lines = [f"== {title}: {self.total} cases ({dict(self.origins)})"]
        for rpc in sorted(self.cases):
            histogram = ", ".join(f"{k}={v}" for k, v in self.codes[rpc].most_common())
            mean = 1000 * self.seconds[rpc] / self.cases[rpc]
            lines.append(f"  {rpc:38} {self.cases[rpc]:6} {mean:6.0f} ms  {histogram}")
        distinct = self.distinct()
        lines.append(
            f"  UNKNOWN={self.count('UNKNOWN')} INTERNAL={self.count('INTERNAL')} "
            f"invariant breaks={self.invariant_breaks} failures={len(self.failures)} "
            f"(distinct {len(distinct)}) unsendable={self.unsendable}"
        )
        for failure, rpcs, seen in distinct[:show]:
            lines.append(f"  - [{failure.kind}] {failure.code} x{seen} on {', '.join(rpcs)}")
            lines.append(f"      answer: {failure.detail}")
            lines.append(f"      case:   {failure.case}")
        return "\n".join(lines)
