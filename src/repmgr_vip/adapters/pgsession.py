"""Long-lived PostgreSQL connections for the daemon: the steady state starts no backend.

A connection per query costs every node a fork, an authentication and a log line (with
log_connections) per peer per period: thousands per hour for a question whose answer rarely
changes. The daemon instead keeps one connection per node and reuses it every cycle. Every
wait stays bounded as in `cluster.connect` (connect timeout, keepalives, TCP user timeout,
statement and lock timeouts) plus the client-side deadline of `cluster.with_deadline`, so a
frozen server never hangs the caller. A connection is checked out while a query runs on it:
one whose query outlived its deadline is never handed to another query; it is closed by the
thread that still waits on it, whenever the server lets go.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from repmgr_vip.adapters import cluster
from repmgr_vip.config.schema import Config
from repmgr_vip.core.errors import CommandFailed
from repmgr_vip.core.model import NodeRecord

MAX_IDLE = 2  # two callers at once (local view and node list) open at most a second one
FIRST_BACKOFF = 0.1


class _Call:
    """One query's fate, shared by the caller and the helper thread running it."""

    def __init__(self) -> None:
        self.abandoned = False
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.rows: list[Any] = []
        self.error: BaseException | None = None


class _Worker:
    """A kept helper thread that runs one query at a time for a session.

    Why: `cluster.with_deadline` starts a thread per query (about 0.1 ms of CPU each, every
    node every period); a kept one costs a queue hand-over. A worker whose query outlived its
    deadline is never given another: it ends once the server lets go, as with_deadline's
    abandoned thread does.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], list[Any]], _Call] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"query {name}")
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, call = job
            try:
                call.rows = fn()
            except BaseException as exc:  # handed to the caller
                call.error = exc
            call.done.set()

    def submit(self, fn: Callable[[], list[Any]], call: _Call) -> None:
        self._jobs.put((fn, call))

    def stop(self) -> None:
        """Ends the thread after the job it runs now, if any."""
        self._jobs.put(None)


class NodeSession:
    """One node's connection, opened on first use and reused while it works.

    After a failure to connect, the next attempt waits a backoff that doubles up to
    `max_backoff` (the daemon's period): a node that is down costs a connection attempt per
    period at most, and one that comes back is used again within a period.
    """

    def __init__(self, conninfo: str, timeout: float, max_backoff: float, name: str,
                 connect: Callable[[str, float], Any] = cluster.connect) -> None:
        self.conninfo = conninfo
        self.timeout = timeout
        self.max_backoff = max(FIRST_BACKOFF, max_backoff)
        self.name = name
        self.connects = 0  # connections opened so far: each one is a new backend
        self._connect = connect
        self._guard = threading.Lock()
        self._idle: list[Any] = []
        self._failures = 0
        self._next_try = 0.0
        self._last_error = ""
        self._closed = False
        self._workers: list[_Worker] = []  # idle helper threads (at most MAX_IDLE)

    # --- connections ------------------------------------------------------------------

    def _checkout(self) -> tuple[Any, bool]:
        """(connection, reused): an idle one, else a new one unless backing off."""
        with self._guard:
            while self._idle:
                conn = self._idle.pop()
                if not (conn.closed or conn.broken):
                    return conn, True
            wait = self._next_try - time.monotonic()
            if wait > 0:
                raise CommandFailed(f"{self.name}: reconnecting in {wait:.1f} s "
                                    f"(last error: {self._last_error})")
        try:
            conn = self._connect(self.conninfo, self.timeout)
        except Exception as exc:
            with self._guard:
                self._failures += 1
                delay = min(self.max_backoff, FIRST_BACKOFF * 2 ** (self._failures - 1))
                self._next_try = time.monotonic() + delay
                self._last_error = cluster._one_line(exc)
            raise
        with self._guard:
            self.connects += 1
            self._failures = 0
            self._next_try = 0.0
        return conn, False

    def _checkin(self, conn: Any, call: _Call) -> None:
        with call.lock, self._guard:
            keep = (not call.abandoned and not self._closed and len(self._idle) < MAX_IDLE
                    and not (conn.closed or conn.broken))
            if keep:
                self._idle.append(conn)
        if not keep:
            _close(conn)

    def _run(self, read: Callable[[Any], list[Any]], call: _Call) -> list[Any]:
        conn, reused = self._checkout()
        try:
            rows = read(conn)
        except Exception:
            if not reused or not (conn.closed or conn.broken):
                self._checkin(conn, call)  # a query error on a healthy connection
                raise
            _close(conn)  # the server went away since the last cycle (restart, failover):
            conn, reused = self._checkout()  # one fresh try before calling the node down
            try:
                rows = read(conn)
            except Exception:
                self._checkin(conn, call)
                raise
        self._checkin(conn, call)
        return rows

    # --- queries ----------------------------------------------------------------------

    def fetch(self, sql: str) -> list[Any]:
        """All rows of `sql`; raises on any failure, within timeout + 1 s whatever happens."""
        return self._bounded(lambda conn: list(conn.execute(sql).fetchall()))

    def _bounded(self, read: Callable[[Any], list[Any]]) -> list[Any]:
        """read(connection) in a helper thread, given up on after timeout + 1 s.

        libpq's connect_timeout bounds only the connection, and statement_timeout is enforced
        by the server, which a frozen server does not do: so the query runs in a helper thread
        and the caller stops waiting after the deadline (see cluster.with_deadline).
        """
        call = _Call()
        with self._guard:
            worker = self._workers.pop() if self._workers else None
        if worker is None:
            worker = _Worker(self.name)
        worker.submit(lambda: self._run(read, call), call)
        timeout = self.timeout + 1.0
        if not call.done.wait(timeout):
            with call.lock:
                call.abandoned = True  # the connection still carries the query: never reuse
            worker.stop()  # nor the thread: it ends when the server lets go
            raise cluster.QueryTimeout(f"{self.name}: no answer within {timeout:g} s")
        with self._guard:
            keep = not self._closed and len(self._workers) < MAX_IDLE
            if keep:
                self._workers.append(worker)
        if not keep:
            worker.stop()
        if call.error is not None:
            raise call.error
        return call.rows

    def view(self, node_id: int, *, bounded: bool = True) -> cluster.NodeView:
        """What the node says about itself, like cluster.query_view, on the kept connection.

        bounded=False runs the query in the caller's own thread, with no deadline of ours:
        only for a caller whose waiting harms nobody because its readers already judge its
        answers by their age (daemon.PeerWatcher); it saves a thread hand-over per query.
        """
        try:
            rows = self._bounded(read_role) if bounded else self._run(read_role, _Call())
            return cluster.NodeView(node_id, reachable=True, in_recovery=bool(rows[0][0]),
                                    timeline=int(rows[0][1]))
        except Exception as exc:  # any failure means "cannot tell", never a crash
            return cluster.NodeView(node_id, reachable=False, error=cluster._one_line(exc))

    def close(self) -> None:
        """Closes the idle connections; one still carrying a query closes when it returns."""
        with self._guard:
            self._closed = True
            idle, self._idle = self._idle, []
            workers, self._workers = self._workers, []
        for conn in idle:
            _close(conn)
        for worker in workers:
            worker.stop()


ROLE_STATEMENT = b"repmgr_vip_role"
_prepared: weakref.WeakSet[Any] = weakref.WeakSet()  # connections that hold ROLE_STATEMENT


def read_role(conn: Any) -> list[Any]:
    """cluster.ROLE_QUERY as one row (in recovery, timeline), on libpq directly.

    Every node answers it every period for every daemon: a psycopg cursor's adapters and row
    makers cost twice the client CPU of this (67 against 30 us a query, measured) for two
    values. Prepared once per connection, so the server does not plan it every time either.
    """
    from psycopg import pq

    pgconn = conn.pgconn
    if conn not in _prepared:
        _check(pgconn.prepare(ROLE_STATEMENT, cluster.ROLE_QUERY.encode()),
               pq.ExecStatus.COMMAND_OK)
        _prepared.add(conn)
    result = pgconn.exec_prepared(ROLE_STATEMENT, None)
    _check(result, pq.ExecStatus.TUPLES_OK)
    if result.ntuples != 1 or result.nfields != 2:
        raise CommandFailed(f"role query: {result.ntuples} rows of {result.nfields} columns")
    in_recovery, timeline = result.get_value(0, 0), result.get_value(0, 1)
    if in_recovery not in (b"t", b"f") or timeline is None:
        raise CommandFailed(f"role query: unexpected values {in_recovery!r}, {timeline!r}")
    return [(in_recovery == b"t", int(timeline))]


def _check(result: Any, wanted: int) -> None:
    if result.status != wanted:
        lines = (result.error_message or b"").decode("utf-8", "replace").strip().splitlines()
        raise CommandFailed(f"role query: {lines[0] if lines else result.status}")


def _close(conn: Any) -> None:
    with contextlib.suppress(Exception):  # a broken connection must not raise into the loop
        conn.close()


def registered_nodes(session: NodeSession, config: Config) -> list[NodeRecord]:
    """repmgr.nodes read on the local node's kept connection (cluster.registered_nodes' twin)."""
    try:
        rows = session.fetch(cluster.NODES_QUERY)
    except Exception as exc:
        raise CommandFailed(f"cannot read repmgr.nodes: {cluster._one_line(exc)}") from exc
    return cluster.remember_rows(config, rows)


NODES_EVERY = 30.0


class NodeListGate:
    """Says when repmgr.nodes can have changed and is worth reading again.

    The table changes when nodes are registered, removed or change role: so it is read at
    start, every `every` seconds, and as soon as the role, timeline or reachability of any
    node (this one included) differs from what it was at the last read.
    """

    def __init__(self, every: float = NODES_EVERY) -> None:
        self.every = every
        self._read_at: float | None = None
        self._seen: tuple[Any, ...] | None = None

    @staticmethod
    def fingerprint(views: Sequence[cluster.NodeView]) -> tuple[Any, ...]:
        return tuple(sorted((v.node_id, v.reachable, v.in_recovery, v.timeline) for v in views))

    def due(self, now: float, views: Sequence[cluster.NodeView]) -> bool:
        if self._read_at is None or now - self._read_at >= self.every:
            return True
        return self.fingerprint(views) != self._seen

    def read(self, now: float, views: Sequence[cluster.NodeView]) -> None:
        """Records a successful read and what the nodes looked like at that moment."""
        self._read_at = now
        self._seen = self.fingerprint(views)
