"""Reads log files with millisecond times: repmgr-vip's own, and PostgreSQL's.

The hooks write `YYYY-mm-dd HH:MM:SS.mmm [node] LEVEL message`; the lab runs every process with
TZ=UTC, so the times convert to epoch seconds without guessing a zone. PostgreSQL's lines
(`log_line_prefix` '%m [%p] ') tell when a promoted server began to accept writes.
"""

from __future__ import annotations

import re
from calendar import timegm
from dataclasses import dataclass
from pathlib import Path
from time import strptime

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) \[([^\]]+)\] (\w+) (.*)$")
PG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) UTC \[(\d+)\] (\w+): +(.*)$")
FENCING_SECONDS = re.compile(r"\((\d+(?:\.\d+)?) s\)\s*$")


@dataclass(frozen=True)
class LogLine:
    t: float
    node: str
    level: str
    message: str


def read_log(path: Path, line: re.Pattern[str] = LINE) -> list[LogLine]:
    """Lines of a repmgr-vip log (or, with PG_LINE, a PostgreSQL log) that carry a time."""
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


def fencing_seconds(line: LogLine) -> float | None:
    """The duration fence_others measured itself, from `...; VIP free (1.57 s)`."""
    match = FENCING_SECONDS.search(line.message)
    return float(match.group(1)) if match else None
