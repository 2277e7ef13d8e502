"""PeerWatcher: one thread per peer, its queries on that thread, a frozen peer ages out."""

from __future__ import annotations

import threading
import time
from typing import Any

from repmgr_vip.adapters.pgsession import NodeSession
from repmgr_vip.app.daemon import PeerWatcher
from repmgr_vip.core.model import NodeRecord
from repmgr_vip.testing import FakeLibpq


class Peer:
    """A fake server: answers "standby on timeline 3" unless frozen; records query threads."""

    def __init__(self) -> None:
        self.frozen = threading.Event()
        self.thaw = threading.Event()
        self.threads: set[int] = set()
        self.queries = 0

    def connect(self, conninfo: str, timeout: float) -> Any:
        peer = self

        def answer() -> tuple[bool, int]:
            peer.threads.add(threading.get_ident())
            peer.queries += 1
            if peer.frozen.is_set():
                peer.thaw.wait(10)
            return True, 3

        class Conn:
            closed = broken = False
            pgconn = FakeLibpq(answer)

            def close(self) -> None:
                self.closed = True
        return Conn()


def _watcher(peer: Peer, interval: float = 0.05) -> PeerWatcher:
    record = NodeRecord(2, "node2", "standby", True, "host=192.0.2.12", 1)
    watcher = PeerWatcher(record, interval, threading.Event())
    watcher.session = NodeSession(record.conninfo, 0.2, interval, "node 2",
                                  connect=peer.connect)
    return watcher


def test_the_watcher_runs_its_queries_on_its_own_thread() -> None:
    """No helper thread per query (a hand-over per peer per period is CPU at 7 nodes)."""
    peer = Peer()
    watcher = _watcher(peer)
    watcher.start()
    try:
        deadline = time.monotonic() + 5
        while peer.queries < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        view = watcher.view(stale_after=1.0)
        assert view.reachable and view.in_recovery and view.timeline == 3
        assert peer.threads == {watcher.ident}
    finally:
        watcher.retire()
        watcher.join(2)
    assert not watcher.is_alive()


def test_a_frozen_peer_counts_as_unreachable_once_its_view_is_stale() -> None:
    peer = Peer()
    watcher = _watcher(peer)
    watcher.start()
    try:
        deadline = time.monotonic() + 5
        while not watcher.view(stale_after=1.0).reachable and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.view(stale_after=0.3).reachable
        peer.frozen.set()  # SIGSTOP: the query never returns while it lasts
        time.sleep(0.5)
        view = watcher.view(stale_after=0.3)
        assert not view.reachable
        peer.frozen.clear()
        peer.thaw.set()  # it answers again: the same watcher picks up
        deadline = time.monotonic() + 5
        while not watcher.view(stale_after=0.3).reachable and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.view(stale_after=0.3).reachable
    finally:
        watcher.retire()
        peer.thaw.set()
        watcher.join(2)
