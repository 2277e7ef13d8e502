"""Notices within a fraction of a second that a cut-off node's sshd answers again.

The release retrier asks a cut-off node over ssh; each attempt sends a SYN when it starts and
once more a second later (the kernel's SYN retransmission). When the link comes back, the next
of those SYNs can be up to a second away, and that second is spent with the VIP on two nodes.
A non-blocking connect to the node's SSH port every PROBE_EVERY costs one socket and no
process; its answer lets the retrier start an attempt at once.

The probe only hastens attempts, never replaces them: where ssh goes through a proxy, or the
address cannot be resolved in time, there is no probe and the attempts keep their pace.
"""

from __future__ import annotations

import errno
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from repmgr_vip.config.schema import Config

PROBE_EVERY = 0.2  # a fresh SYN this often while the node is silent
REST_AFTER_ANSWER = 2.0  # at most one early attempt per this long (sshd logs each probe)
RESOLVE_WITHIN = 3.0  # ssh -G plus the name lookup


@dataclass(frozen=True)
class Endpoint:
    family: int
    address: tuple[str, int] | tuple[str, int, int, int]


def parse_ssh_g(text: str) -> tuple[str, int] | None:
    """(hostname, port) from `ssh -G` output; None when ssh would go through a proxy (a
    connect to the host's port would then say nothing about what ssh reaches)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key.lower(), value.strip())
    if values.get("proxycommand", "none") != "none" or values.get("proxyjump", "none") != "none":
        return None
    hostname, port = values.get("hostname", ""), values.get("port", "")
    if not hostname or not port.isdigit():
        return None
    return hostname, int(port)


def ssh_endpoint(config: Config, host: str) -> Endpoint | None:
    """Where `ssh host` would connect, as ssh itself resolves it (ssh_config, ssh_options)."""
    from repmgr_vip.adapters.process import run
    from repmgr_vip.adapters.remote import ssh_options
    from repmgr_vip.core.errors import CommandFailed

    try:
        result = run([config.commands.ssh, *ssh_options(config), "-G", "--", host],
                     timeout=RESOLVE_WITHIN)
    except CommandFailed:
        return None
    target = parse_ssh_g(result.stdout) if result.returncode == 0 else None
    if target is None:
        return None
    try:
        infos = socket.getaddrinfo(target[0], target[1], type=socket.SOCK_STREAM)
    except OSError:
        return None
    family, _, _, _, address = infos[0]
    return Endpoint(family, address)  # type: ignore[arg-type]


class ReachProbe:
    """answered(now) is True once the endpoint accepted a connection, then rests a while.

    The endpoint is looked up in a thread (a name lookup during a partition may hang); until
    it is known, or if it cannot be, the probe says nothing.
    """

    def __init__(self, resolve: Callable[[], Endpoint | None]) -> None:
        self._endpoint: Endpoint | None = None
        self._socket: socket.socket | None = None
        self._opened_at = 0.0
        self._quiet_until = 0.0
        self._closed = False
        threading.Thread(target=self._resolve, args=(resolve,), daemon=True).start()

    def _resolve(self, resolve: Callable[[], Endpoint | None]) -> None:
        self._endpoint = resolve()

    def answered(self, now: float) -> bool:
        endpoint = self._endpoint
        if endpoint is None or self._closed or now < self._quiet_until:
            return False
        if self._socket is not None:
            outcome = self._outcome()
            if outcome is None and now - self._opened_at < PROBE_EVERY:
                return False
            self._drop()
            if outcome == 0:
                self._quiet_until = now + REST_AFTER_ANSWER
                return True
            if outcome is not None:  # refused or unreachable: try again in a moment
                self._quiet_until = now + PROBE_EVERY
                return False
        self._open(endpoint, now)
        return False

    def _open(self, endpoint: Endpoint, now: float) -> None:
        sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(endpoint.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._quiet_until = now + PROBE_EVERY
            return
        self._socket, self._opened_at = sock, now

    def _outcome(self) -> int | None:
        """0 connected, an errno if it failed, None while the SYN is unanswered."""
        assert self._socket is not None
        _, writable, _ = select.select([], [self._socket], [], 0)
        if not writable:
            return None
        return self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def _drop(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def close(self) -> None:
        self._closed = True
        self._drop()
