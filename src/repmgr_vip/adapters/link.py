"""Remote releases over the warm link: the peer's daemon, through our SSH master's forward.

`repmgr-vip release` over ssh starts a Python, loads the configuration and changes the address
through sudo on the peer, while the fencing round waits: hundreds of milliseconds, more with
every node on a loaded host. The peer's daemon has all of that warm, and our master to its
host forwards a local socket to its control socket (sshmux.link_path): one request line
(`{"op": "release"}`) and one reply, a round trip plus the address change.

The request goes out with the connection, before the greeting comes back (one round trip
less: release is safe to have been done even when we then fall back). For the old primary,
whose release Fencing asks last, `prepare` opens and greets its connection while the others
release, so its own release is a single round trip.

Whenever the link cannot give that answer (no forwarded socket, no greeting within the
bound, a refusal, a reply that is not ok), the session starts the ssh exec release instead,
as if the link had not existed; the caller (Fencing) sees one session either way. Every wait
is bounded: the greeting by control.CONNECT_BOUND, the reply by ssh_command_timeout.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from repmgr_vip.adapters import control, sshmux
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.remote import RemoteResult
from repmgr_vip.config.schema import Config
from repmgr_vip.core.model import NodeRecord
from repmgr_vip.core.ports import ReleaseResult, ReleaseSession, RemoteRelease

# a greeted connection older than this is not used: the peer's daemon waits
# control.REQUEST_WAIT for the request; prepare() opens a new one once one is older than
# PREPARED_RENEW (the daemon prepares every cycle while a failover looms)
PREPARED_FOR = control.REQUEST_WAIT - 1.0
PREPARED_RENEW = PREPARED_FOR / 2


class PreparedLink:
    """A connection to a peer's daemon, opened and greeted in a thread of its own ahead of
    the request (LinkRelease.prepare)."""

    def __init__(self, path: Path | None, bound: float) -> None:
        self.path = path
        self.bound = bound
        self.opened = time.monotonic()
        self._conv: control.Conversation | None = None
        self.done = threading.Event()  # opened and greeted, or failed
        threading.Thread(target=self._open, daemon=True, name="link-prepare").start()

    def _open(self) -> None:
        with contextlib.suppress(Exception):  # any failure: the session connects itself
            if self.path is not None:
                self._conv = control.connect(self.path, self.bound)
        self.done.set()

    def take(self) -> control.Conversation | None:
        """The greeted conversation, or None (failed, or older than PREPARED_FOR)."""
        self.done.wait(self.bound)
        conv, self._conv = self._conv, None
        if conv is not None and time.monotonic() - self.opened > PREPARED_FOR:
            conv.close()
            return None
        return conv

    def close(self) -> None:
        conv = self.take()
        if conv is not None:
            conv.close()


class LinkSession:
    """One remote release: over the link in a thread of its own, else the fallback's."""

    def __init__(self, node: NodeRecord, path: Path | None, request: dict[str, object],
                 timeout: float, fallback: Callable[[], ReleaseSession],
                 bound: float = control.CONNECT_BOUND,
                 prepared: PreparedLink | None = None) -> None:
        self.node = node
        self.prepared = prepared
        self.path = path
        self.request = request
        self.timeout = timeout
        self.bound = bound
        self.start_fallback = fallback
        self.via = "link"  # or "ssh" once the link gave no usable answer
        self.why = ""  # why the link was not used
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._killed = False
        self._conv: control.Conversation | None = None
        self._outcome: ReleaseResult | None = None
        self._fallback: ReleaseSession | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"link-release-{node.node_id}")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._ask()
        except Exception as exc:  # a bug here must not leave the round without its release
            self.why = f"{type(exc).__name__}: {exc}"
        with self._lock:
            if self._outcome is None and not self._killed:
                self.via = "ssh"
                LOG.info("node %s: no release over the warm link (%s); over ssh exec",
                         self.node.node_name, self.why)
                self._fallback = self.start_fallback()
        self._done.set()

    def _ask(self) -> None:
        if self.path is None:
            self.why = "no private socket directory"
            return
        conv = self.prepared.take() if self.prepared is not None else None
        if conv is not None and not conv.send(self.request):  # closed meanwhile: unprepared
            conv.close()
            conv = None
        try:
            if conv is None:
                conv = control.connect(self.path, self.bound, request=self.request)
        except control.Unavailable as exc:
            self.why = exc.reason
            return
        with conv:
            with self._lock:
                if self._killed:
                    return
                self._conv = conv
            try:
                reply = conv.receive(self.timeout)
            finally:
                with self._lock:
                    self._conv = None
        if reply is None:
            self.why = ("closed the connection" if conv.closed
                        else f"gave no reply within {self.timeout:g} s")
            return
        if not reply.get("ok") or "raise" in reply:
            self.why = f"failed there: {reply.get('raise') or reply.get('error') or '?'}"
            return
        macs = reply.get("macs")
        self._outcome = RemoteResult(
            self.node.host, 0, f"{reply.get('message', 'released')} (warm link)", "",
            tuple(str(m).lower() for m in macs) if isinstance(macs, list) else ())

    def finished(self) -> bool:
        if not self._done.is_set():
            return False
        return self._fallback is None or self._fallback.finished()

    def result(self) -> ReleaseResult:
        if self._fallback is not None:
            return self._fallback.result()
        if self._outcome is not None:
            return self._outcome
        return RemoteResult(self.node.host, -1, "", "killed")

    def kill(self) -> None:
        with self._lock:
            self._killed = True
            conv = self._conv
            fallback = self._fallback
        if conv is not None:  # wakes the thread's select at once
            with contextlib.suppress(OSError):
                conv.sock.shutdown(socket.SHUT_RDWR)
        if fallback is not None:
            fallback.kill()

    def join(self, timeout: float | None = None) -> None:
        """For tests: the link's part is over (answered, or the fallback started)."""
        self._done.wait(timeout)


class LinkRelease:
    """The daemon's RemoteRelease: the warm link first, `fallback` (ssh exec) otherwise.

    `config` and `fallback` are read at each release, so a reloaded configuration applies."""

    def __init__(self, config: Callable[[], Config],
                 fallback: Callable[[], RemoteRelease]) -> None:
        self.config = config
        self.fallback = fallback
        self._prepared: dict[str, PreparedLink] = {}
        self._lock = threading.Lock()

    def prepare(self, node: NodeRecord) -> None:
        """Opens and greets the link to `node` now, for its release asked a moment later;
        keeps one opened less than PREPARED_RENEW ago."""
        path = sshmux.link_path(self.config(), node)
        if path is None:
            return
        with self._lock:
            old = self._prepared.get(node.node_name)
            if old is not None and time.monotonic() - old.opened < PREPARED_RENEW:
                return
            self._prepared[node.node_name] = PreparedLink(path, control.CONNECT_BOUND)
        if old is not None:
            old.close()

    def start_release(self, node: NodeRecord) -> LinkSession:
        config = self.config()
        request: dict[str, object] = {"op": "release", "from": config.repmgr.node_name,
                                      "id": f"{os.getpid()}-{os.urandom(6).hex()}"}
        with self._lock:
            prepared = self._prepared.pop(node.node_name, None)
        return LinkSession(node, sshmux.link_path(config, node), request,
                           float(config.fencing.ssh_command_timeout),
                           lambda: self.fallback().start_release(node), prepared=prepared)
