"""Facts about the cluster, gathered into plain immutable data for the decision code.

Metadata in repmgr.nodes is written only on the primary, and a returning old primary still
believes it is primary; so the truth comes from asking every node itself: is it in recovery,
and on which timeline. Queries run in parallel with short timeouts, and a node that does not
answer is recorded as unreachable rather than raising.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from repmgr_vip.config import Config
from repmgr_vip.errors import CommandFailed
from repmgr_vip.repmgrconf import parse_conninfo

ROLE_QUERY = """
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery()
            THEN COALESCE((SELECT received_tli FROM pg_stat_wal_receiver),
                          (SELECT timeline_id FROM pg_control_checkpoint()))
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END
"""

NODES_CACHE = "repmgr-vip-nodes.json"

NODES_QUERY = """
SELECT node_id, node_name, type, active, conninfo, COALESCE(upstream_node_id, 0)
  FROM repmgr.nodes ORDER BY node_id
"""


@dataclass(frozen=True)
class NodeRecord:
    """A row of repmgr.nodes."""

    node_id: int
    node_name: str
    node_type: str  # primary | standby | witness
    active: bool
    conninfo: str
    upstream_node_id: int

    @property
    def host(self) -> str:
        return parse_conninfo(self.conninfo).get("host", "")


@dataclass(frozen=True)
class NodeView:
    """What one node says about itself right now."""

    node_id: int
    reachable: bool
    in_recovery: bool | None = None
    timeline: int | None = None
    error: str = ""

    @property
    def is_primary(self) -> bool:
        return self.reachable and self.in_recovery is False


def connect(conninfo: str, timeout: float) -> Any:
    import psycopg  # lazy: keeps the short-lived hook path fast when no query is needed

    return psycopg.connect(conninfo, connect_timeout=max(1, int(timeout)), autocommit=True)


def query_view(node_id: int, conninfo: str, timeout: float) -> NodeView:
    try:
        with connect(conninfo, timeout) as conn:
            conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
            row = conn.execute(ROLE_QUERY).fetchone()
    except Exception as exc:  # any failure means "cannot tell", never a crash
        return NodeView(node_id, reachable=False, error=_one_line(exc))
    return NodeView(node_id, reachable=True, in_recovery=bool(row[0]), timeline=int(row[1]))


def local_view(config: Config, timeout: float = 3.0) -> NodeView:
    return query_view(config.repmgr.node_id, config.repmgr.conninfo, timeout)


def registered_nodes(config: Config, timeout: float = 3.0) -> list[NodeRecord]:
    """repmgr.nodes as the local node sees it (a standby has a replicated copy)."""
    try:
        with connect(config.repmgr.conninfo, timeout) as conn:
            rows = conn.execute(NODES_QUERY).fetchall()
    except Exception as exc:
        raise CommandFailed(
            f"cannot read repmgr.nodes through conninfo of {config.repmgr.path}: "
            f"{_one_line(exc)}; is the local PostgreSQL running and the node registered?"
        ) from exc
    records = [NodeRecord(int(r[0]), str(r[1]), str(r[2]), bool(r[3]), str(r[4]), int(r[5]))
               for r in rows]
    _remember(config, records)
    return records


def _cache_path(config: Config) -> Path:
    return config.state_dir / NODES_CACHE


def _remember(config: Config, records: list[NodeRecord]) -> None:
    """Keeps the node list on disk so a hook can start fencing before PostgreSQL answers."""
    path = _cache_path(config)
    tmp = path.with_name(path.name + f".{os.getpid()}")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps([asdict(r) for r in records]), encoding="utf-8")
        tmp.replace(path)


def cached_nodes(config: Config) -> list[NodeRecord]:
    """The node list as last read from repmgr.nodes on this node; empty if never read."""
    try:
        data = json.loads(_cache_path(config).read_text(encoding="utf-8"))
        return [NodeRecord(**item) for item in data]
    except (OSError, ValueError, TypeError):
        return []


def query_views(nodes: Iterable[NodeRecord], timeout: float) -> dict[int, NodeView]:
    """Asks every node in parallel; the slowest answer is bounded by `timeout`."""
    node_list = list(nodes)
    if not node_list:
        return {}
    with ThreadPoolExecutor(max_workers=len(node_list)) as pool:
        views = pool.map(lambda n: query_view(n.node_id, n.conninfo, timeout), node_list)
        return {view.node_id: view for view in views}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
