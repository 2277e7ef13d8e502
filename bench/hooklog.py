"""Reads PostgreSQL's log with millisecond times: when a promoted server began to accept writes.

PostgreSQL's lines (`log_line_prefix` '%m [%p] ') carry their time; the lab runs every process
with TZ=UTC, so the times convert to epoch seconds without guessing a zone. repmgr-vip's own
decisions and instants come from its decision journal (bench/journalread.py), not its log.
"""

from __future__ import annotations

import re
from calendar import timegm
from dataclasses import dataclass
from pathlib import Path
from time import strptime

PG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) UTC \[(\d+)\] (\w+): +(.*)$")


@dataclass(frozen=True)
class LogLine:
    t: float
    node: str
    level: str
    message: str


def read_log(path: Path, line: re.Pattern[str] = PG_LINE) -> list[LogLine]:
    """Lines of a PostgreSQL log that carry a time."""
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        match = line.match(raw)
        if match:
            stamp, millis, node, level, message = match.groups()
            t = timegm(strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
            lines.append(LogLine(t, node, level, message))
    return lines


def first(lines: list[LogLine], pattern: str, after: float = 0.0) -> LogLine | None:
    """The first line at or after `after` whose message matches the regular expression."""
    regex = re.compile(pattern)
    return next((ln for ln in lines if ln.t >= after and regex.search(ln.message)), None)
