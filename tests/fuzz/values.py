"""Hypothesis strategies for single values: the numbers, text and bytes a hostile caller sends.

Each strategy mixes the whole range of the type with the values that break code most often
(limits, zero, negatives, NaN and infinities, NUL and control characters, very long strings).
Invalid UTF-8 cannot be put in a string field through the Python API; the raw-bytes cases
(cases.py) send it on the wire instead.
"""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import strategies as st

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

_LIMITS = (2**31 - 1, -(2**31), 2**32 - 1, 2**62, 2**63 - 1, 2**63, -(2**63), 2**64 - 1)
# Small numbers, the limits of each width, and counts and seconds around the request limits.
_EDGE_INTS = (0, 1, -1, 2, 7, 1023, 1024, 1025, 86400, 86401, 604800, 604801, *_LIMITS)

# Strings that have broken servers before: SQL and format syntax, separators of the selector
# language, NUL and other control characters, unicode of every width, lengths around limits.
TRICKY_TEXT = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t",
    "\n",
    "\r\n",
    "\x1b[31m",
    "\x7f",
    "\u0085",
    "\u2028",
    "\ufeff",
    "é",
    "日本語",
    "🙂",
    "\U0010ffff",
    "'",
    '"',
    "\\",
    "%s%n",
    "{0}",
    "' OR 1=1 --",
    "SELECT 1; DROP TABLE devices; --",
    "a,b",
    "a=",
    "=b",
    "in (",
    "kind=",
    "!",
    "kind in (a,b)",
    "x>=NaN",
    "x>=inf",
    "x<=1e309",
    "x>-1e400",
    "..",
    "../../etc/passwd",
    "null",
    "None",
    "1e999",
    "-0",
    "x" * 64,
    "x" * 65,
    "x" * 128,
    "x" * 129,
    "x" * 256,
    "x" * 257,
    "x" * 1024,
    "x" * 1025,
)

_FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324)


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Any integer of the range, often a well-known edge, often one of the widest values (the
    limits of the type, and 2**63 and up, which a signed 64-bit column cannot hold)."""
    edges = sorted({v for v in _EDGE_INTS if low <= v <= high})
    wide = sorted({v for v in (low, high, low + 1, high - 1, *_LIMITS) if low <= v <= high})
    return st.one_of(st.integers(low, high), st.sampled_from(edges), st.sampled_from(wide[::-1]))


def floats(width: int = 64) -> st.SearchStrategy[float]:
    edges = [v for v in _FLOAT_EDGES if width == 64 or abs(v) < 3e38 or v != v]
    return st.one_of(st.floats(width=width), st.sampled_from(edges))  # type: ignore[arg-type]


def text() -> st.SearchStrategy[str]:
    """Short unicode (control characters included), tricky strings, or very long runs."""
    return st.one_of(
        st.text(max_size=24),
        st.sampled_from(TRICKY_TEXT),
        st.tuples(st.sampled_from(TRICKY_TEXT), st.text(max_size=8)).map("".join),
        st.integers(2000, 70000).map(lambda n: "x" * n),
    )


def binary() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=64),
        st.integers(1, 300_000).map(lambda n: bytes([n % 251]) * n),
    )


def duration() -> st.SearchStrategy[duration_pb2.Duration]:
    """Any seconds and nanos, valid or not (mixed signs, nanos past a second)."""
    return st.builds(
        duration_pb2.Duration,
        seconds=st.one_of(integers(*INT64), st.integers(-5, 5)),
        nanos=st.one_of(st.just(0), integers(*INT32)),
    )


def timestamp() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    return st.builds(timestamp_pb2.Timestamp, seconds=integers(*INT64), nanos=integers(*INT32))


def short_duration(max_seconds: float) -> st.SearchStrategy[duration_pb2.Duration]:
    """A valid duration of 0 to `max_seconds` (what a well-behaved caller sends)."""

    def make(millis: int) -> duration_pb2.Duration:
        d = duration_pb2.Duration()
        d.FromMilliseconds(millis)
        return d

    return st.integers(0, int(max_seconds * 1000)).map(make)
