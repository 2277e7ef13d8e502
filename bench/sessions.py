"""New PostgreSQL sessions per node over a window: what the daemons cost the servers.

`pg_stat_database.sessions` (PostgreSQL 14+) counts every backend start, whatever its
database. One psql reads the sum at the start of the window and one at the end; the reading
sessions themselves are counted too, so a window with no other connection shows a small
constant (measured without daemons by `baseline`), never zero.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lab import Lab, Node

SESSIONS_SQL = "SELECT COALESCE(sum(sessions), 0) FROM pg_stat_database"


def session_count(lab: Lab, node: Node) -> int:
    """Sessions started on the node since its statistics were last reset."""
    return int(lab.psql(node, SESSIONS_SQL, dbname="postgres"))


def counts(lab: Lab) -> dict[str, int]:
    """Every node read at about the same moment (in parallel)."""
    with ThreadPoolExecutor(max_workers=len(lab.nodes)) as pool:
        values = pool.map(lambda n: session_count(lab, n), lab.nodes)
        return {node.name: value for node, value in zip(lab.nodes, values, strict=True)}


def new_sessions(lab: Lab, seconds: float) -> dict[str, Any]:
    """Sessions started on each node during `seconds` (the two reads included)."""
    before = counts(lab)
    began = time.monotonic()
    time.sleep(seconds)
    after = counts(lab)
    elapsed = time.monotonic() - began
    per_node = {name: after[name] - before[name] for name in before}
    return {"seconds": elapsed, "per_node": per_node,
            "per_minute": {name: n * 60.0 / elapsed for name, n in per_node.items()}}
