"""The daemon's control socket: hooks hand their VIP steps to the running daemon.

A hook is a fresh process: it pays for Python's start-up, the PostgreSQL driver, new SSH
connections and sudo before it can move the VIP. The daemon already has all of that warm, so a
hook that finds it asks it to do the step, over a Unix socket in the state directory.

Protocol (one JSON object per line, UTF-8): the daemon greets every connection it accepts
(`{"hello": 1, "pid": N}`) after checking the peer's credentials (SO_PEERCRED: only the
daemon's own user and root); the hook then sends one request line and reads one reply line,
each within a deadline. A step may take a second exchange on the same connection (promote).
A hook that gets no greeting within CONNECT_BOUND, or no reply within the step's deadline,
does the step itself: every step is idempotent and taken under the node's VIP lock, so a late
daemon and the hook never both act at once, and doing a step twice changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from repmgr_vip.adapters.log import LOG

PROTOCOL = 1
CONNECT_BOUND = 0.2  # connect + the daemon's greeting; a daemon that cannot do this is hung
# how long the daemon waits for the request line after its greeting (a peer's daemon keeps
# a greeted link open while a failover looms: link.PreparedLink)
REQUEST_WAIT = 5.0
MAX_LINE = 64 * 1024
SOCKET_MODE = 0o666  # anyone may connect; the credentials decide (and a refusal is counted)
REPLAY_KEEP = 128  # replies kept for requests replayed with the same id
REPLAY_SECONDS = 300.0
_UCRED = struct.Struct("3i")  # pid, uid, gid
SUN_PATH_MAX = 107
ACCEPT_BACKSTOP = 5.0  # seconds an idle accept loop sleeps between looks at `stopping`


class Unavailable(Exception):
    """No usable answer from a daemon: the caller does the step itself."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """The connecting process's credentials, as the kernel recorded them at connect()."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    return Peer(pid, uid, gid)


class Conversation:
    """One connection: JSON lines out and in, every read bounded by a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.closed = False  # the other side hung up (EOF) or the socket failed
        self.on_reply: Callable[[dict[str, Any]], None] | None = None  # sees each send()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, message: dict[str, Any]) -> bool:
        """False if the other side is gone (it gave up waiting, or was killed)."""
        if self.on_reply is not None:
            self.on_reply(message)
        data = (json.dumps(message, default=str, ensure_ascii=True) + "\n").encode()
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True
            return False
        return True

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next line as an object; None if none came within `timeout` or the peer left
        (then `closed` is set). A line that is not a JSON object closes the conversation."""
        deadline = time.monotonic() + max(0.0, timeout)
        while b"\n" not in self.buffer:
            if self.closed:
                return None
            remaining = deadline - time.monotonic()
            try:
                ready = select.select([self.sock], [], [], max(0.0, remaining))[0]
                chunk = self.sock.recv(65536) if ready else None
            except (OSError, ValueError):
                chunk = b""
            if chunk is None:
                return None
            if not chunk or len(self.buffer) + len(chunk) > MAX_LINE:
                self.closed = True
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.closed = True
            return None
        return message

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Sends one request line and returns the reply line; Unavailable otherwise."""
        if not self.send(request):
            raise Unavailable("closed the connection")
        reply = self.receive(timeout)
        if reply is None:
            raise Unavailable("closed the connection" if self.closed
                              else f"gave no reply within {timeout:g} s")
        return reply


def connect(path: Path, bound: float = CONNECT_BOUND, *,
            request: dict[str, Any] | None = None) -> Conversation:
    """A conversation with the daemon serving `path`, greeted within `bound` seconds.

    Unavailable when no daemon serves it (no socket, a stale one), when it refuses us, or
    when it does not greet in time (stopped, hung, overloaded).

    `request` goes out before the greeting comes back, one round trip sooner (over an SSH
    forward each one passes two ssh processes): only for a request that may be carried out
    even when we give up on the greeting and do the step another way (a peer's release).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    started = time.monotonic()
    try:
        sock.settimeout(bound)
        sock.connect(os.fsencode(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise Unavailable("not running") from None
    except OSError as exc:
        sock.close()
        raise Unavailable(f"cannot connect to {path}: {exc.strerror or exc}") from None
    conv = Conversation(sock)
    if request is not None and not conv.send(request):
        conv.close()
        raise Unavailable("closed the connection")
    hello = conv.receive(bound - (time.monotonic() - started))
    if hello is None or hello.get("hello") != PROTOCOL:
        conv.close()
        if hello is not None and "refused" in hello:
            raise Unavailable(f"refused: {hello['refused']}")
        raise Unavailable(f"no greeting within {bound * 1000:.0f} ms" if not conv.closed
                          else "closed the connection without a greeting")
    return conv


# --- the daemon's side ------------------------------------------------------------------

Handler = Callable[[dict[str, Any], Conversation, Peer], None]


@dataclass
class _Served:
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None
    at: float = field(default_factory=time.monotonic)


class ControlServer(threading.Thread):
    """Accepts hooks on the socket; each request runs in a thread of its own.

    Only the users in `allowed_uids` are served; anyone else gets one refusal line and
    `on_refused` is called (the daemon counts it). A request carrying an `id` already served
    for an op in `replayable` gets the first reply again and runs nothing a second time.
    """

    def __init__(self, path: Path, handler: Handler, *, allowed_uids: Collection[int],
                 on_refused: Callable[[Peer], None], replayable: Collection[str] = (),
                 stop: threading.Event | None = None) -> None:
        super().__init__(daemon=True, name="control")
        self.path = path
        self.handler = handler
        self.allowed_uids = frozenset(allowed_uids)
        self.on_refused = on_refused
        self.replayable = frozenset(replayable)
        self.stopping = stop if stop is not None else threading.Event()
        self.sock: socket.socket | None = None
        self._inode: int | None = None
        self._served: OrderedDict[str, _Served] = OrderedDict()
        self._lock = threading.Lock()
        self._active: set[threading.Thread] = set()

    def bind(self) -> None:
        """Binds under a temporary name and renames over the final one, so a hook never
        finds the path missing while a daemon restarts; OSError if that cannot be done, or
        if another daemon already answers there."""
        if len(os.fsencode(self.path)) > SUN_PATH_MAX:
            raise OSError(f"{self.path} is too long for a Unix socket; use a shorter state_dir")
        with contextlib.suppress(Unavailable), connect(self.path):
            raise OSError(f"another daemon already serves {self.path}")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(os.fsencode(tmp))
            os.chmod(tmp, SOCKET_MODE)
            sock.listen(16)
            os.replace(tmp, self.path)
            self._inode = os.stat(self.path, follow_symlinks=False).st_ino
        except OSError:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # close() wakes a blocked accept by shutting the socket down (Linux: EINVAL); the
        # timeout is only a backstop, so an idle daemon is not woken four times a second
        sock.settimeout(ACCEPT_BACKSTOP)
        self.sock = sock

    def run(self) -> None:
        assert self.sock is not None, "bind() first"
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    break
                time.sleep(0.05)
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                      name="control-request")
            with self._lock:
                self._active.add(thread)
            thread.start()

    def close(self, wait: float = 0.0) -> None:
        """Stops accepting, removes the socket if it is still ours, and gives the steps
        under way up to `wait` seconds to finish (a hook whose daemon vanishes mid-step
        does the step itself, but finishing is quicker for it)."""
        self.stopping.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path, follow_symlinks=False).st_ino == self._inode:
                os.unlink(self.path)
        deadline = time.monotonic() + wait
        with self._lock:
            active = list(self._active)
        for thread in active:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._converse(conn)
        finally:
            with self._lock:
                self._active.discard(threading.current_thread())

    def _converse(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        with Conversation(conn) as conv:
            try:
                peer = peer_of(conn)
            except OSError:
                return
            if peer.uid not in self.allowed_uids:
                self.on_refused(peer)
                conv.send({"refused": f"uid {peer.uid} may not use this socket"})
                return
            if not conv.send({"hello": PROTOCOL, "pid": os.getpid()}):
                return
            request = conv.receive(REQUEST_WAIT)
            if request is None:
                return
            rid = request.get("id")
            if isinstance(rid, str) and request.get("op") in self.replayable:
                served, first = self._remember(rid)
                if not first:
                    served.done.wait(REQUEST_WAIT + 60.0)
                    conv.send(served.reply or {"ok": False, "error": "first request failed"})
                    return

                def keep(reply: dict[str, Any]) -> None:
                    if served.reply is None:
                        served.reply = reply
                        served.done.set()

                conv.on_reply = keep
                try:
                    self._handle(request, conv, peer)
                finally:
                    served.done.set()
                return
            self._handle(request, conv, peer)

    def _handle(self, request: dict[str, Any], conv: Conversation, peer: Peer) -> None:
        try:
            self.handler(request, conv, peer)
        except Exception as exc:  # a bug here must not leave the hook waiting: it acts itself
            LOG.exception("control: %s failed", request.get("op"))
            conv.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _remember(self, rid: str) -> tuple[_Served, bool]:
        with self._lock:
            now = time.monotonic()
            while self._served and (len(self._served) >= REPLAY_KEEP or
                                    now - next(iter(self._served.values())).at > REPLAY_SECONDS):
                self._served.popitem(last=False)
            served = self._served.get(rid)
            if served is not None:
                return served, False
            served = self._served[rid] = _Served()
            return served, True
