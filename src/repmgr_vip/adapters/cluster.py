"""Facts about the cluster, gathered into plain immutable data for the decision code.

Metadata in repmgr.nodes is written only on the primary, and a returning old primary still
believes it is primary; so the truth comes from asking every node itself: is it in recovery,
and on which timeline. Queries run in parallel with short timeouts, and a node that does not
answer is recorded as unreachable rather than raising.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from repmgr_vip.adapters import statefiles
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config
from repmgr_vip.core.conninfo import parse_conninfo
from repmgr_vip.core.errors import CommandFailed, VipError
from repmgr_vip.core.model import NodeRecord
from repmgr_vip.core.model import NodeView as NodeView  # re-exported: callers import it here

T = TypeVar("T")

ROLE_QUERY = """
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery()
            THEN COALESCE((SELECT received_tli FROM pg_stat_wal_receiver),
                          (SELECT timeline_id FROM pg_control_checkpoint()))
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END
"""

NODES_CACHE = statepaths.NODES_CACHE

NODES_QUERY = """
SELECT node_id, node_name, type, active, conninfo, COALESCE(upstream_node_id, 0)
  FROM repmgr.nodes ORDER BY node_id
"""


class QueryTimeout(CommandFailed):
    """A query did not finish within its client-side deadline (a stalled or frozen server)."""


def with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Runs fn in a helper thread and stops waiting after `timeout` seconds.

    libpq's connect_timeout bounds only the connection, and statement_timeout is enforced by
    the server, which a frozen server does not do. The abandoned thread ends when the server
    answers or TCP gives up (keepalives, tcp_user_timeout); the caller never waits longer.
    """
    box: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True, name=f"query {what}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise QueryTimeout(f"{what}: no answer within {timeout:g} s")
    if error:
        raise error[0]
    return box[0]


def connect(conninfo: str, timeout: float) -> Any:
    """A connection whose every wait is bounded: connect, statements, locks and dead peers."""
    import psycopg  # lazy: keeps the short-lived hook path fast when no query is needed

    millis = max(100, int(timeout * 1000))
    try:  # keep the DBA's own options; ours bound the statement and any lock wait
        own = parse_conninfo(conninfo).get("options", "")
    except (VipError, ValueError):
        own = ""  # psycopg reports the malformed conninfo itself
    options = f"{own} -c statement_timeout={millis} -c lock_timeout={millis}".strip()
    return psycopg.connect(
        conninfo, connect_timeout=max(1, int(timeout)), autocommit=True,
        keepalives=1, keepalives_idle=max(1, int(timeout)), keepalives_interval=1,
        keepalives_count=2, tcp_user_timeout=millis, options=options,
        fallback_application_name="repmgr-vip",  # the daemon's kept sessions, by name
    )


def _role_row(conninfo: str, timeout: float) -> tuple[bool, int]:
    with connect(conninfo, timeout) as conn:
        row = conn.execute(ROLE_QUERY).fetchone()
    return bool(row[0]), int(row[1])


def query_view(node_id: int, conninfo: str, timeout: float) -> NodeView:
    """What the node says about itself; within `timeout` plus a second, whatever the server does."""
    try:
        in_recovery, timeline = with_deadline(lambda: _role_row(conninfo, timeout),
                                              timeout + 1.0, f"node {node_id}")
    except Exception as exc:  # any failure means "cannot tell", never a crash
        return NodeView(node_id, reachable=False, error=_one_line(exc))
    return NodeView(node_id, reachable=True, in_recovery=in_recovery, timeline=timeline)


def local_view(config: Config, timeout: float = 3.0) -> NodeView:
    return query_view(config.repmgr.node_id, config.repmgr.conninfo, timeout)


def _node_rows(conninfo: str, timeout: float) -> list[Any]:
    with connect(conninfo, timeout) as conn:
        rows: list[Any] = conn.execute(NODES_QUERY).fetchall()
    return rows


def registered_nodes(config: Config, timeout: float = 3.0) -> list[NodeRecord]:
    """repmgr.nodes as the local node sees it (a standby has a replicated copy)."""
    try:
        rows = with_deadline(lambda: _node_rows(config.repmgr.conninfo, timeout),
                             timeout + 1.0, "repmgr.nodes")
    except Exception as exc:
        raise CommandFailed(
            f"cannot read repmgr.nodes through conninfo of {config.repmgr.path}: "
            f"{_one_line(exc)}; is the local PostgreSQL running and the node registered?"
        ) from exc
    return remember_rows(config, rows)


def remember_rows(config: Config, rows: Iterable[Any]) -> list[NodeRecord]:
    """NODES_QUERY's rows as records, kept on disk for the hooks (see _remember)."""
    records = [NodeRecord(int(r[0]), str(r[1]), str(r[2]), bool(r[3]), str(r[4]), int(r[5]))
               for r in rows]
    _remember(config, records)
    return records


def checkpoint(config: Config, timeout: float) -> None:
    """CHECKPOINT on the local node (needs a superuser or pg_checkpoint, as repmgr's user is)."""
    def run() -> None:
        with connect(config.repmgr.conninfo, timeout) as conn:
            conn.execute("CHECKPOINT")

    try:
        with_deadline(run, timeout + 1.0, "CHECKPOINT")
    except Exception as exc:
        raise CommandFailed(f"CHECKPOINT failed: {_one_line(exc)}") from exc


def refuses_connections(conninfo: str, timeout: float = 0.5) -> bool:
    """True when nothing listens where conninfo points: PostgreSQL is surely not running.

    Judged by the socket's errno (connection refused, no socket file), never by libpq's
    message, whose words depend on lc_messages. A host given as a name is not resolved
    (DNS can hang), so it never counts as surely down.
    """
    try:
        params = parse_conninfo(conninfo)
    except (VipError, ValueError):
        return False
    port = params.get("port", "5432").split(",")[0] or "5432"
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    host = params.get("host", "").split(",")[0]
    try:
        if not host or host.startswith("/"):
            path = os.path.join(host or "/var/run/postgresql", f".s.PGSQL.{port}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(path)
            return False
        address = ipaddress.ip_address(host)
    except (FileNotFoundError, ConnectionRefusedError):
        return True
    except (OSError, ValueError):
        return False
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((str(address), int(port)))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def _cache_path(config: Config) -> Path:
    return statepaths.nodes_cache(config.state_dir)


def _remember(config: Config, records: list[NodeRecord]) -> None:
    """Keeps the node list on disk so a hook can start fencing before PostgreSQL answers."""
    with contextlib.suppress(OSError):
        statefiles.write_atomic(_cache_path(config), json.dumps([asdict(r) for r in records]))


def cached_nodes(config: Config) -> list[NodeRecord]:
    """The node list as last read from repmgr.nodes on this node; empty if never read."""
    try:
        data = json.loads(statefiles.read_text(_cache_path(config)))
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
