"""How the CLI prints: aligned tables for people, JSON (and CSV) for scripts, a progress bar
on a terminal, one-line errors."""

from __future__ import annotations

import csv
import dataclasses
import enum
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TextIO


def plain(value: Any) -> Any:
    """A JSON-ready copy: dataclasses → objects, enums → names, times → ISO 8601 strings,
    durations → seconds."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def print_json(value: Any, out: TextIO | None = None) -> None:
    """One JSON document on stdout."""
    json.dump(plain(value), out or sys.stdout, indent=2, sort_keys=True)
    (out or sys.stdout).write("\n")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO | None = None) -> None:
    """An aligned plain-text table."""
    text = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
    stream = out or sys.stdout
    for row in text:
        stream.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        stream.write("\n")


def json_line(value: Any) -> str:
    """One compact JSON object, as a line of JSON Lines (without the newline)."""
    return json.dumps(plain(value), sort_keys=True)


class CsvLines:
    """CSV written as it comes: the header at once, then each row flushed as it is written,
    so a run stopped half-way leaves every row it had."""

    def __init__(self, headers: Sequence[str], out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self._writer = csv.writer(self.out)
        self._writer.writerow(headers)
        self.out.flush()

    def write(self, row: Sequence[Any]) -> None:
        """One row, flushed."""
        self._writer.writerow(row)
        self.out.flush()


class JsonLines:
    """JSON Lines written as they come: each value one complete line, flushed."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def write(self, value: Any) -> None:
        """One value, flushed."""
        self.out.write(json_line(value) + "\n")
        self.out.flush()


def when(value: datetime | None) -> str:
    """A time for a table: local, to the second."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


class Progress:
    """`[#####.....] 12/40` redrawn on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()

    def advance(self, failed: bool = False) -> None:
        """One more item done."""
        self.done += 1
        self.failed += int(failed)
        if self.enabled:
            width = 30
            filled = width * self.done // max(1, self.total)
            bar = "#" * filled + "." * (width - filled)
            extra = f", {self.failed} failed" if self.failed else ""
            self.stream.write(f"\r{self.label}[{bar}] {self.done}/{self.total}{extra}")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()
