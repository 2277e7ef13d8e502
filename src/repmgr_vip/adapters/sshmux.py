"""Warm SSH links to the peers: OpenSSH connection multiplexing, kept open by the daemon.

A fresh SSH connection costs a TCP handshake, a key exchange and an authentication: most of
a remote release's time, paid exactly when a failover is waiting for it. With
`ControlMaster=auto`, every ssh that repmgr-vip runs (hooks, fencing, status) reuses a master
connection to that host when one is up, and becomes one (kept `ControlPersist` seconds after
its last use) when none is. The daemon keeps a master up to every peer, so the hooks find
the links warm. This is OpenSSH's own, audited transport with the trust repmgr already
requires: no new port, no new credentials.

The sockets live in a private directory (0700, owned by the user running ssh) in the state
directory. ssh authenticates nothing on that socket beyond the file permissions, so the
directory is checked before every use: if it is not ours and private, no multiplexing.
A DBA can turn it off with `-o ControlPath=none` in repmgr.conf's ssh_options (the first
value of an ssh option wins, and ssh_options come before these).

The warm link: once a master to a peer is up, the keeper also has it forward a Unix socket
in the same private directory to that peer's daemon control socket (OpenSSH streamlocal
forwarding, `ssh -O forward -L LOCAL:REMOTE`). A promoting node's daemon then asks the peer's
daemon to release over that socket (adapters/link.py): one round trip on the open SSH
connection, no process started there. sshd connects to the remote socket as the login user,
the remote daemon's own, so its credentials check admits it. A peer whose sshd refuses
streamlocal forwarding, or whose daemon is not running, simply gets the ssh exec path.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from repmgr_vip.adapters import control
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.process import Started, first_line, run, start
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config
from repmgr_vip.core.errors import CommandFailed
from repmgr_vip.core.model import NodeRecord

CONTROL_PERSIST = 60  # seconds a master stays after its last client
KEEP_EVERY = 30.0  # the daemon checks its masters this often (well inside CONTROL_PERSIST)
CHECK_TIMEOUT = 3.0
HOSTS_EVERY = 1.0  # how often the keeper looks for a changed peer list (no process started)
# sun_path holds 108 bytes with the NUL; ssh binds a master at "PATH.<16 random chars>" first
SUN_PATH_MAX = 107
HASH_LEN = 40  # %C: a SHA-1 in hex of local host, remote host, port and user
TEMP_SUFFIX = 17
LINK_PREFIX = "link-"  # + 16 hex: a forwarded socket, well inside HASH_LEN + TEMP_SUFFIX
LINK_CHECK_BOUND = 1.0  # the keeper's own look at a link: the greeting through it


def control_dir(config: Config) -> Path | None:
    """This user's private socket directory, created if missing; None if unusable.

    Unusable: too long a path for a Unix socket, not a directory (a symlink), not owned by
    this user or open to others, or not creatable (read-only or full state directory).
    """
    path = statepaths.ssh_control_dir(config.state_dir, os.geteuid())
    if len(os.fsencode(path)) + 1 + HASH_LEN + TEMP_SUFFIX > SUN_PATH_MAX:
        return None
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return None
    if info.st_mode & 0o077:
        try:
            os.chmod(path, 0o700, follow_symlinks=False)
        except (OSError, NotImplementedError):
            return None
    return path


def control_options(config: Config) -> list[str]:
    """The ssh options that share one connection per peer; [] when they cannot be used."""
    directory = control_dir(config)
    if directory is None:
        return []
    # StreamLocalBindUnlink: whichever ssh becomes the master binds the warm links' sockets
    # (see link_path); a file left by a master that died must not block the new one
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={directory}/%C",
            "-o", f"ControlPersist={CONTROL_PERSIST}", "-o", "StreamLocalBindUnlink=yes"]


def link_path(config: Config, node: NodeRecord) -> Path | None:
    """Where the master to node's host forwards node's daemon control socket (the warm
    link); None if no private directory. Named by a hash: short, whatever the host is."""
    directory = control_dir(config)
    if directory is None or not node.host or ":" in str(directory):  # ssh splits -L at ":"
        return None
    digest = hashlib.sha256(f"{node.host}\0{node.node_name}".encode()).hexdigest()[:16]
    return directory / f"{LINK_PREFIX}{digest}"


def _ssh(config: Config, host: str, *args: str) -> list[str]:
    """ssh with the same options as remote.ssh_argv (so the same %C, the same master)."""
    from repmgr_vip.adapters.remote import ssh_options

    return [config.commands.ssh, *ssh_options(config), *args, "--", host]


def master_alive(config: Config, host: str) -> bool:
    """`ssh -O check`: a master for host answers on its socket (it also restarts its timer)."""
    if not control_options(config):
        return False
    try:
        result = run(_ssh(config, host, "-O", "check"), timeout=CHECK_TIMEOUT)
    except CommandFailed:
        return False
    return result.returncode == 0


def control_socket_path(config: Config, host: str) -> str | None:
    """The master's socket for host as ssh itself expands ControlPath (`ssh -G`: prints the
    configuration, connects nowhere); None if ssh cannot say."""
    try:
        result = run(_ssh(config, host, "-G"), timeout=CHECK_TIMEOUT)
    except CommandFailed:
        return None
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "controlpath" and value and value != "none":
            return value
    return None


def mux_alive(path: str, timeout: float = CHECK_TIMEOUT) -> bool:
    """What `ssh -O check` asks, in-process: the master's hello, then MUX_C_ALIVE_CHECK
    (OpenSSH PROTOCOL.mux, version 4). A fork of ssh from the daemon cost ~6 ms of CPU per
    peer every KEEP_EVERY; this costs a few syscalls. Like the check, it restarts the
    master's ControlPersist timer (a mux client came and went)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(_mux_packet(MUX_MSG_HELLO, MUX_VERSION))
            kind, _ = _mux_read(sock)
            if kind != MUX_MSG_HELLO:
                return False
            sock.sendall(_mux_packet(MUX_C_ALIVE_CHECK, MUX_REQUEST_ID))
            kind, body = _mux_read(sock)
            return kind == MUX_S_ALIVE and body[:4] == struct.pack(">I", MUX_REQUEST_ID)
    except (OSError, ValueError):
        return False


MUX_MSG_HELLO, MUX_C_ALIVE_CHECK, MUX_S_ALIVE = 0x00000001, 0x10000004, 0x80000005
MUX_VERSION = 4
MUX_REQUEST_ID = 1
MUX_MAX_PACKET = 1 << 16


def _mux_packet(kind: int, value: int) -> bytes:
    return struct.pack(">III", 8, kind, value)


def _mux_read(sock: socket.socket) -> tuple[int, bytes]:
    """One length-prefixed packet: (its type, the rest)."""
    length = struct.unpack(">I", _recv_exactly(sock, 4))[0]
    if not 4 <= length <= MUX_MAX_PACKET:
        raise ValueError("bad mux packet length")
    payload = _recv_exactly(sock, length)
    return struct.unpack(">I", payload[:4])[0], payload[4:]


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("mux: connection closed")
        data += chunk
    return data


def forward(config: Config, host: str, local: Path, remote: str) -> str:
    """`ssh -O forward -L LOCAL:REMOTE`: the master to host forwards a Unix socket (a forward
    it already has is left as it is); "" if done, else why not."""
    try:
        result = run(_ssh(config, host, "-O", "forward", "-L", f"{local}:{remote}"),
                     timeout=CHECK_TIMEOUT)
    except CommandFailed as exc:
        return str(exc)
    if result.returncode == 0:
        return ""
    return first_line(result.stderr) or first_line(result.stdout) or f"exit {result.returncode}"


def link_answers(path: Path, bound: float = LINK_CHECK_BOUND) -> str:
    """"" if a daemon greets through the link at path, else why not (nothing is asked)."""
    try:
        with control.connect(path, bound):
            return ""
    except control.Unavailable as exc:
        return exc.reason


def start_master(config: Config, host: str) -> Started | None:
    """`ssh -f -N`: a master that goes to the background once authenticated."""
    try:
        return start(_ssh(config, host, "-f", "-N"))
    except CommandFailed as exc:
        LOG.warning("cannot start an SSH master to %s: %s", host, exc)
        return None


def discover_control_path(config: Config, node: NodeRecord) -> tuple[str, str]:
    """(node's daemon control socket, "") asked once over the master, or ("", why not).

    Each node has its own state directory (and so its own socket path): the node's own
    `repmgr-vip control-path` says where, with its own configuration."""
    from repmgr_vip.adapters.remote import remote_vip_command, run_remote

    argv = remote_vip_command(config, node.node_name, node.node_id, "control-path")
    result = run_remote(config, node.host, argv)
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if not result.ok or not lines:
        text = first_line(result.stderr) or first_line(result.stdout)
        return "", f"`control-path` failed there (exit {result.returncode}): {text}"
    path = lines[-1]
    # ssh reads "-L LOCAL:REMOTE": a colon or a space in the path would be misread
    if not path.startswith("/") or ":" in path or any(c.isspace() for c in path):
        return "", f"unusable control socket path {path!r}"
    return path, ""


class MasterKeeper(threading.Thread):
    """The daemon's background thread keeping an SSH master up to every peer.

    Never blocks the daemon's cycle: it only reads the current host list through `hosts`.
    Every `every` seconds, a master that answers `ssh -O check` is left alone (the check
    keeps it from expiring); a missing or dead one is started again (`ssh -f -N`), bounded
    by ConnectTimeout, so an unreachable peer costs one attempt per round.

    With `peers` (the registered nodes), each live master also carries the warm link to
    each node on its host (link_path): set up as soon as the master is up, looked at every
    round (a greeting through it; when none comes, forwarded again: idempotent).
    """

    def __init__(self, config: Callable[[], Config], hosts: Callable[[], Sequence[str]],
                 stop: threading.Event, every: float = KEEP_EVERY,
                 peers: Callable[[], Sequence[NodeRecord]] | None = None) -> None:
        super().__init__(daemon=True, name="ssh-masters")
        self.config = config  # read each round: a reloaded configuration applies at once
        self.hosts = hosts
        self.stop_event = stop
        self.every = every
        self.peers = peers
        self.starting: dict[str, tuple[float, Started]] = {}
        self.remote_paths: dict[tuple[str, str], str] = {}  # (host, node): its socket there
        self.socket_paths: dict[tuple[str, ...], str | None] = {}  # `ssh -G` argv: master's
        self.link_state: dict[tuple[str, str], str] = {}  # "" linked, else why not (logged)

    def settle(self) -> list[str]:
        """Masters whose start ended: the hosts where one came up."""
        up = []
        for host, (at, started) in list(self.starting.items()):
            if started.finished():  # the foreground ssh ended: the master is up or failed
                if started.wait(0) == 0:
                    up.append(host)
                started.close()
                del self.starting[host]
            elif time.monotonic() - at > self.every:  # stuck (ConnectTimeout bounds it)
                started.kill()
                del self.starting[host]
        return up

    def keep(self) -> None:
        """One round: check every peer's master, start the missing ones, keep the links."""
        config = self.config()
        if not control_options(config):
            return
        self.settle()
        alive = []
        for host in dict.fromkeys(h for h in self.hosts() if h):
            if self.stop_event.is_set():
                return
            if host in self.starting:
                continue
            if self._alive(config, host):
                alive.append(host)
                continue
            master = start_master(config, host)
            if master is not None:
                self.starting[host] = (time.monotonic(), master)
        self.link(config, alive)

    def _alive(self, config: Config, host: str) -> bool:
        """The master answers on its socket: checked in-process once ssh told us where the
        socket is (asked once per host and configuration), else with `ssh -O check`."""
        key = tuple(_ssh(config, host, "-G"))  # everything the answer depends on
        if key not in self.socket_paths:
            self.socket_paths[key] = control_socket_path(config, host)
        path = self.socket_paths[key]
        return mux_alive(path) if path is not None else master_alive(config, host)

    def link(self, config: Config, hosts: Sequence[str]) -> None:
        """The warm links of the nodes on `hosts` (their masters are up); logged per change."""
        if self.peers is None or not hosts:
            return
        for node in self.peers():
            if node.host not in hosts or self.stop_event.is_set():
                continue
            key = (node.host, node.node_name)
            why = self._link(config, node)
            if self.link_state.get(key) != why:
                self.link_state[key] = why
                if why:
                    LOG.warning("no warm link to node %s (%s): releases there go over ssh "
                                "exec", node.node_name, why)
                else:
                    LOG.info("warm link to node %s's daemon up", node.node_name)

    def _link(self, config: Config, node: NodeRecord) -> str:
        """"" once node's daemon greets through its link; else why not."""
        local = link_path(config, node)
        if local is None:
            return "no private socket directory"
        if not link_answers(local):
            return ""
        key = (node.host, node.node_name)
        remote = self.remote_paths.get(key)
        if remote is None:
            remote, why = discover_control_path(config, node)
            if not remote:
                return why
            self.remote_paths[key] = remote
        why = forward(config, node.host, local, remote)
        if why:
            return f"forwarding refused: {why}"
        why = link_answers(local)
        return f"its daemon does not answer through it ({why}; not running, or sshd " \
               "refuses streamlocal forwarding)" if why else ""

    def run(self) -> None:
        last_hosts: list[str] = []
        last_round = float("-inf")
        while True:
            hosts = list(self.hosts())
            try:
                # a round at once for a new peer list (the first one included), else every
                # `every`; meanwhile a master just up gets its links at once
                if hosts != last_hosts or time.monotonic() - last_round >= self.every:
                    last_hosts, last_round = hosts, time.monotonic()
                    self.keep()
                elif self.starting:
                    self.link(self.config(), self.settle())
            except Exception as exc:  # a bad round must not end the thread
                LOG.warning("keeping SSH masters: %s", exc)
            if self.stop_event.wait(HOSTS_EVERY):
                break
        for _, started in self.starting.values():
            started.kill()
