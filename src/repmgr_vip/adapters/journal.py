"""The decision journal: one JSON line per decision and per action, in the state directory.

Hooks, the daemon and manual commands all write here, so one file tells what each process
decided and why, with the inputs that mattered. Tests, the bench and the daemon's metrics
read it instead of log wording. Appends are single write() calls of whole lines
(O_APPEND), so concurrent writers never interleave inside a line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from repmgr_vip.adapters import statefiles
from repmgr_vip.config import statepaths

JOURNAL_FILE = statepaths.JOURNAL
MAX_BYTES = 4 * 1024 * 1024  # then the file is rotated to .1 (one generation kept)


def journal_path(state_dir: Path) -> Path:
    return statepaths.journal_file(state_dir)


def record(state_dir: Path, node: str, source: str, action: str, reason: str, *,
           alarm: str = "", outcome: str = "", **inputs: Any) -> None:
    """Appends one entry; never raises (a full disk must not stop a failover)."""
    entry: dict[str, Any] = {"time": round(time.time(), 3), "node": node, "source": source,
                             "pid": os.getpid(), "action": action, "reason": reason}
    if alarm:
        entry["alarm"] = alarm
    if outcome:
        entry["outcome"] = outcome
    if inputs:
        entry["inputs"] = inputs
    line = (json.dumps(entry, default=str, ensure_ascii=True) + "\n").encode()
    path = journal_path(state_dir)
    try:
        if path.stat().st_size > MAX_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
    except OSError:
        return
    try:
        statefiles.fix_owner_and_mode(fd, path)  # a root run must not lock postgres out
        os.write(fd, line)
    except OSError:
        pass
    finally:
        os.close(fd)


def read(state_dir: Path) -> Iterator[Mapping[str, Any]]:
    """Every readable entry, oldest first (a torn last line is skipped)."""
    yield from read_from(state_dir, 0)[0]


def read_from(state_dir: Path, offset: int) -> tuple[list[Mapping[str, Any]], int]:
    """Entries appended since `offset` and the new offset (0 again after a rotation)."""
    path = journal_path(state_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return [], 0
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < offset:
            offset = 0
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    entries: list[Mapping[str, Any]] = []
    for raw in data[:end].splitlines():
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if isinstance(item, dict):
            entries.append(item)
    return entries, offset + end
