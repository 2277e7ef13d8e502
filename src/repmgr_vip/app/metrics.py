"""Prometheus metrics for the daemon (prometheus-client, imported only by the daemon).

The endpoint is served by one thread, whatever the number of clients: a connection is read
without blocking until its request head is complete, and only then handed to
prometheus_client's MetricsHandler. An idle or slow connection costs a socket for at most
CONNECTION_TIMEOUT seconds, never a thread, and never delays another scrape.
"""

from __future__ import annotations

import contextlib
import io
import selectors
import socket
import socketserver
import threading
import time
from http.server import HTTPServer
from typing import TYPE_CHECKING, Any

from repmgr_vip.adapters.log import LOG

if TYPE_CHECKING:
    from repmgr_vip.core.decide import Decision, Snapshot

ROLES = ("primary", "standby", "down")
CONNECTION_TIMEOUT = 3.0  # an idle or slow client is dropped after this many seconds
MAX_PENDING = 64  # open connections still sending their request; the oldest is dropped
MAX_HEAD = 16384  # bytes of request line and headers accepted


class MetricsServer(HTTPServer):
    """A plain (single-threaded) HTTPServer fed by a selector loop; see the module docstring."""

    def __init__(self, address: str, port: int, registry: Any) -> None:
        from prometheus_client.exposition import MetricsHandler

        heads: dict[int, bytes] = {}

        class Handler(MetricsHandler):
            timeout = CONNECTION_TIMEOUT

            def setup(self) -> None:
                super().setup()
                # the request head was already read by the selector loop
                self.rfile = io.BytesIO(heads.pop(self.request.fileno(), b""))

        self.heads = heads
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        super().__init__((address, port), Handler.factory(registry))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # stop() writes here: the loop sleeps until a client or stop, not in 0.5 s ticks
        self._wake_r, self._wake_w = socket.socketpair()

    def server_bind(self) -> None:
        """Binds without HTTPServer's reverse DNS lookup of our own address (it can hang)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.loop, name="metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.server_close()
        self._wake_r.close()
        self._wake_w.close()

    @staticmethod
    def _timeout(pending: dict[socket.socket, tuple[Any, float, bytes]]) -> float | None:
        """Until the first pending client's deadline; None (no timeout) with no client."""
        if not pending:
            return None
        return max(0.0, min(deadline for _, deadline, _ in pending.values()) - time.monotonic())

    def loop(self) -> None:
        pending: dict[socket.socket, tuple[Any, float, bytes]] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=self._timeout(pending)):
                    if key.fileobj is self._wake_r:
                        continue  # stop() was called: the loop condition ends it
                    if key.fileobj is self.socket:
                        self._accept(selector, pending)
                    else:
                        conn = key.fileobj
                        assert isinstance(conn, socket.socket)
                        self._read(selector, pending, conn)
                now = time.monotonic()
                for conn, (_, deadline, _) in list(pending.items()):
                    if now >= deadline:
                        self._drop(selector, pending, conn)
            for conn in list(pending):
                self._drop(selector, pending, conn)

    def _accept(self, selector: selectors.BaseSelector,
                pending: dict[socket.socket, tuple[Any, float, bytes]]) -> None:
        try:
            conn, peer = self.socket.accept()
        except OSError:
            return
        conn.setblocking(False)
        if len(pending) >= MAX_PENDING:
            self._drop(selector, pending, next(iter(pending)))
        pending[conn] = (peer, time.monotonic() + CONNECTION_TIMEOUT, b"")
        selector.register(conn, selectors.EVENT_READ)

    def _read(self, selector: selectors.BaseSelector,
              pending: dict[socket.socket, tuple[Any, float, bytes]],
              conn: socket.socket) -> None:
        peer, deadline, head = pending[conn]
        try:
            data = conn.recv(MAX_HEAD)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        head += data
        if not data or len(head) > MAX_HEAD:
            self._drop(selector, pending, conn)
            return
        if b"\r\n\r\n" not in head and b"\n\n" not in head:
            pending[conn] = (peer, deadline, head)
            return
        selector.unregister(conn)
        del pending[conn]
        conn.setblocking(True)
        conn.settimeout(CONNECTION_TIMEOUT)  # bounds the answer to a client that stops reading
        self.heads[conn.fileno()] = head
        try:
            self.process_request(conn, peer)
        except Exception as exc:  # one bad client must never stop the endpoint
            LOG.warning("metrics request from %s failed: %s", peer, exc)
            self.heads.pop(conn.fileno(), None)
            self.shutdown_request(conn)

    @staticmethod
    def _drop(selector: selectors.BaseSelector,
              pending: dict[socket.socket, tuple[Any, float, bytes]],
              conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(conn)
        pending.pop(conn, None)
        conn.close()


class Metrics:
    def __init__(self, address: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.address = address
        self.port = port
        self.registry = CollectorRegistry()
        r = self.registry
        self.held = Gauge("repmgr_vip_held", "1 if this node holds the VIP", registry=r)
        self.address_held = Gauge("repmgr_vip_address_held", "1 if this node holds this "
                                  "address of the VIP (dual stack: one per address)",
                                  ["address"], registry=r)
        self.replica_held = Gauge("repmgr_vip_replica_held", "1 if this node holds the replica "
                                  "VIP ([replica_vip]; 0 when none is configured)",
                                  registry=r)
        self.replica_address_held = Gauge("repmgr_vip_replica_address_held", "1 if this node "
                                          "holds this address of the replica VIP", ["address"],
                                          registry=r)
        self.role = Gauge("repmgr_vip_role", "1 for the local role", ["role"], registry=r)
        self.peers = Gauge("repmgr_vip_peers_reachable", "other nodes answering", registry=r)
        self.peers_total = Gauge("repmgr_vip_peers", "other registered nodes", registry=r)
        self.decision = Info("repmgr_vip_last_decision", "last decision", registry=r)
        self.conflicts = Counter("repmgr_vip_conflicts", "another host answered for our VIP",
                                 registry=r)
        self.actions = Counter("repmgr_vip_actions", "actions taken", ["action"], registry=r)
        self.split_brain = Gauge("repmgr_vip_split_brain",
                                 "1 while another primary is on this node's timeline", registry=r)
        self.split_brain_cycles = Counter("repmgr_vip_split_brain_cycles",
                                          "cycles that saw two primaries on one timeline",
                                          registry=r)
        self.loop = Histogram("repmgr_vip_loop_seconds", "duration of one cycle", registry=r,
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
        self.lease_left = Gauge("repmgr_vip_lease_remaining_seconds",
                                "VIP lifetime left before this cycle's renewal (vip.lease > 0; "
                                "0: not held, +Inf: permanent)", registry=r)
        self.lease_failures = Counter("repmgr_vip_lease_renewal_failures",
                                      "lease renewals that failed or came too late", registry=r)

        self.server: MetricsServer | None = None

    def start(self) -> None:
        if self.port <= 0:
            return
        try:
            self.server = MetricsServer(self.address, self.port, self.registry)
        except OSError as exc:
            LOG.error("metrics endpoint %s:%d not started: %s", self.address, self.port, exc)
            return
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def action(self, name: str) -> None:
        self.actions.labels(action=name).inc()

    def lease_remaining(self, seconds: float) -> None:
        self.lease_left.set(seconds)

    def lease_failure(self) -> None:
        self.lease_failures.inc()

    def addresses(self, held: dict[str, bool]) -> None:
        for address, on in held.items():
            self.address_held.labels(address=address).set(1 if on else 0)

    def replica(self, held: dict[str, bool]) -> None:
        """The replica VIP's addresses on this node (set by the replica keeper's thread)."""
        for address, on in held.items():
            self.replica_address_held.labels(address=address).set(1 if on else 0)
        self.replica_held.set(1 if held and all(held.values()) else 0)

    def conflict(self) -> None:
        self.conflicts.inc()

    def observe(self, decision: Decision, snapshot: Snapshot, holds: bool,
                seconds: float) -> None:
        self.held.set(1 if holds else 0)
        local = snapshot.local
        role = "down" if not local.reachable else ("standby" if local.in_recovery else "primary")
        for name in ROLES:
            self.role.labels(role=name).set(1 if name == role else 0)
        self.peers.set(sum(1 for p in snapshot.peers if p.view.reachable))
        self.peers_total.set(len(snapshot.peers))
        self.decision.info({"action": decision.action.value, "reason": decision.reason[:200]})
        split = decision.alarm == "split-brain"
        self.split_brain.set(1 if split else 0)
        if split:
            self.split_brain_cycles.inc()
        self.loop.observe(seconds)
