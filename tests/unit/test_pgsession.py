"""NodeSession: one kept connection per node, bounded waits, no reuse of a busy connection."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from repmgr_vip.adapters import cluster
from repmgr_vip.adapters.pgsession import NodeListGate, NodeSession
from repmgr_vip.core.errors import CommandFailed
from repmgr_vip.testing import FakeLibpq


class FakeCursor:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def fetchall(self) -> list[Any]:
        return self.rows


class FakeConn:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.closed = False
        self.broken = False
        self.queries = 0
        self.pgconn = FakeLibpq(self._answer)  # the role query goes to libpq directly

    def _answer(self) -> tuple[bool, int]:
        self.queries += 1
        self.server.threads.add(threading.get_ident())
        if self.server.hold is not None:
            self.server.hold.wait()
        if self.server.restarted_since(self):
            self.broken = True
            raise RuntimeError("server closed the connection unexpectedly")
        return True, 7

    def execute(self, sql: str) -> FakeCursor:
        return FakeCursor([self._answer()])

    def close(self) -> None:
        self.closed = True


class FakeServer:
    """Counts connections (backend starts) like pg_stat_database.sessions."""

    def __init__(self) -> None:
        self.sessions = 0
        self.down = False
        self.hold: threading.Event | None = None
        self.generation = 0
        self.conns: list[tuple[FakeConn, int]] = []
        self.threads: set[int] = set()  # the threads that ran queries

    def connect(self, conninfo: str, timeout: float) -> FakeConn:
        if self.down:
            raise ConnectionRefusedError("connection refused")
        self.sessions += 1
        conn = FakeConn(self)
        self.conns.append((conn, self.generation))
        return conn

    def restarted_since(self, conn: FakeConn) -> bool:
        return any(c is conn and gen != self.generation for c, gen in self.conns)


def _session(server: FakeServer, timeout: float = 0.2, backoff: float = 1.0) -> NodeSession:
    return NodeSession("host=x", timeout, backoff, "node 2", connect=server.connect)


def test_steady_state_reuses_one_connection() -> None:
    server = FakeServer()
    session = _session(server)
    views = [session.view(2) for _ in range(20)]
    assert all(v.reachable and v.in_recovery is True and v.timeline == 7 for v in views)
    assert server.sessions == 1


def test_steady_state_runs_its_queries_on_one_kept_thread() -> None:
    """Not a new thread per query (each costs about 0.1 ms of CPU, every node every period);
    and the caller's own thread never runs one (the deadline needs a helper)."""
    server = FakeServer()
    session = _session(server)
    before = threading.active_count()
    for _ in range(20):
        assert session.view(2).reachable
    assert len(server.threads) == 1 and threading.get_ident() not in server.threads
    assert threading.active_count() <= before + 1
    session.close()
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before  # close() ends the kept thread


def test_restarted_server_reconnects_within_the_same_call() -> None:
    server = FakeServer()
    session = _session(server)
    assert session.view(2).reachable
    server.generation += 1  # PostgreSQL restarted: the kept connection is dead
    assert session.view(2).reachable
    assert server.sessions == 2
    assert server.conns[0][0].closed


def test_the_role_query_is_prepared_once_per_connection() -> None:
    """libpq directly, the statement planned once per backend; a new backend prepares anew."""
    server = FakeServer()
    session = _session(server)
    assert all(session.view(2).reachable for _ in range(5))
    first = server.conns[0][0]
    assert (first.pgconn.prepares, first.queries) == (1, 5)
    server.generation += 1
    view = session.view(2)
    assert view.reachable and view.timeline == 7
    second = server.conns[-1][0]
    assert second is not first and second.pgconn.prepares == 1
    assert first.pgconn.prepares == 1  # the dead one was not prepared again


def test_a_failed_role_query_on_a_healthy_connection_is_a_down_view() -> None:
    server = FakeServer()
    session = _session(server)
    assert session.view(2).reachable
    conn = server.conns[0][0]

    def statement_timeout() -> tuple[bool, int]:
        raise RuntimeError("canceling statement due to statement timeout")

    conn.pgconn.answer = statement_timeout
    assert not session.view(2).reachable
    assert server.sessions == 1  # a query error is no reason to drop a healthy connection


def test_a_down_node_is_retried_with_backoff_not_every_call() -> None:
    server = FakeServer()
    server.down = True
    session = _session(server, backoff=0.3)
    for _ in range(10):
        assert not session.view(2).reachable
    assert server.sessions == 0
    server.down = False
    assert not session.view(2).reachable  # still inside the backoff window
    time.sleep(0.35)
    assert session.view(2).reachable  # within the cap (the period) it is used again
    assert server.sessions == 1


def test_a_query_past_its_deadline_never_lends_its_connection() -> None:
    server = FakeServer()
    before = threading.active_count()
    session = _session(server, timeout=0.1)
    assert session.view(2).reachable
    first = server.conns[0][0]
    server.hold = threading.Event()  # the server freezes
    started = time.monotonic()
    with pytest.raises(cluster.QueryTimeout):
        session.fetch(cluster.ROLE_QUERY)
    assert time.monotonic() - started < 1.5  # timeout + 1 s at most
    hold, server.hold = server.hold, None  # a new query must not queue behind the frozen one
    assert session.view(2).reachable
    assert server.sessions == 2
    assert first.queries == 2  # the frozen connection got no second query
    hold.set()  # the server answers at last: the abandoned connection is closed, not kept
    deadline = time.monotonic() + 2
    while not first.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.closed
    for _ in range(5):
        assert session.view(2).reachable
    assert server.sessions == 2
    assert len(server.threads) == 2  # the frozen query's thread was not given another
    deadline = time.monotonic() + 2
    while threading.active_count() > before + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before + 1  # it ended; one kept thread is left


def test_closed_session_keeps_nothing_open() -> None:
    server = FakeServer()
    session = _session(server)
    session.view(2)
    session.close()
    assert all(conn.closed for conn, _ in server.conns)


def test_backoff_message_names_the_last_error() -> None:
    server = FakeServer()
    server.down = True
    session = _session(server)
    session.view(2)
    with pytest.raises(CommandFailed, match="refused"):
        session.fetch("SELECT 1")


def _view(node_id: int, reachable: bool = True, rec: bool = True, tl: int = 1
          ) -> cluster.NodeView:
    return cluster.NodeView(node_id, reachable, rec if reachable else None,
                            tl if reachable else None)


def test_node_list_is_read_only_when_it_can_have_changed() -> None:
    gate = NodeListGate(every=30)
    views = [_view(1, rec=False), _view(2), _view(3)]
    assert gate.due(0.0, views)
    gate.read(0.0, views)
    assert not gate.due(1.0, views)
    assert not gate.due(29.0, list(reversed(views)))
    assert gate.due(30.0, views)
    assert gate.due(2.0, [_view(1, rec=False), _view(2, rec=False, tl=2), _view(3)])
    assert gate.due(2.0, [_view(1, rec=False), _view(2, reachable=False), _view(3)])
    assert gate.due(2.0, [_view(1, rec=False), _view(2)])  # a node gone from the views


def test_a_failed_single_flight_call_is_retried_by_the_next_call() -> None:
    """The daemon's node list read failing once (a DBA's lock: lock_timeout) must not make
    every later read return the same old failure."""
    from repmgr_vip.app.daemon import SingleFlight

    outcomes: list[Exception | int] = [CommandFailed("lock timeout"), 7]

    def read() -> int:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    flight = SingleFlight(read, "node-list")
    with pytest.raises(CommandFailed):
        flight.call(wait=1.0)
    assert flight.call(wait=1.0) == (7, 0.0)
