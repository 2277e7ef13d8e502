"""What the bench takes from a node's decision journal (STATE_DIR/repmgr-vip-journal.jsonl,
src/repmgr_vip/adapters/journal.py) instead of parsing log wording.

The promote step writes its verdict (source "promote", no outcome) once fencing is done, just
before it starts `repmgr standby promote`; whoever adds the VIP writes action "acquire" with
outcome "held". In the lab the state directory is the node's directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lab import Node
from repmgr_vip.adapters import journal

Entry = Mapping[str, Any]
PROMOTE_SOURCES = ("promote",)


def entries_after(node: Node, after: float) -> list[Entry]:
    return [e for e in journal.read(node.dir) if float(e.get("time", 0.0)) >= after]


def promote_decided(entries: list[Entry]) -> Entry | None:
    """The promote step's verdict after fencing: `repmgr standby promote` starts right after
    it (or is refused)."""
    return next((e for e in entries if e.get("source") in PROMOTE_SOURCES
                 and not e.get("outcome") and e.get("action") not in ("checkpoint",
                                                                        "repmgr-promote")),
                None)


def promote_started(entries: list[Entry]) -> tuple[float, str] | None:
    """When `repmgr standby promote` started and who fenced ("daemon" or "hook"): the
    "repmgr-promote" entry where the hook writes one, else the verdict's time."""
    entry = next((e for e in entries if e.get("action") == "repmgr-promote"), None)
    if entry is not None:
        inputs = entry.get("inputs", {})
        return float(inputs.get("repmgr_started", entry["time"])), str(inputs.get("via", "?"))
    verdict = promote_decided(entries)
    if verdict is None:
        return None
    return float(verdict["time"]), str(verdict.get("inputs", {}).get("via", "hook"))


def vip_added(entries: list[Entry]) -> Entry | None:
    """The first "VIP added here" entry, whoever wrote it (the promote step or a daemon)."""
    return next((e for e in entries if e.get("action") == "acquire"
                 and e.get("outcome") == "held"), None)


def seconds_of(entry: Entry | None) -> float | None:
    return float(entry["time"]) if entry is not None else None


def added_at(entry: Entry) -> float:
    """When the VIP went up: a promotion journals it as held after its settle wait (up to
    2 s later), with the instant of the add in inputs.added_at."""
    return float(entry.get("inputs", {}).get("added_at", entry["time"]))
