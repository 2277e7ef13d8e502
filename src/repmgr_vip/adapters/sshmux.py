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
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.process import Started, run, start
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config
from repmgr_vip.core.errors import CommandFailed

CONTROL_PERSIST = 60  # seconds a master stays after its last client
KEEP_EVERY = 30.0  # the daemon checks its masters this often (well inside CONTROL_PERSIST)
CHECK_TIMEOUT = 3.0
HOSTS_EVERY = 1.0  # how often the keeper looks for a changed peer list (no process started)
# sun_path holds 108 bytes with the NUL; ssh binds a master at "PATH.<16 random chars>" first
SUN_PATH_MAX = 107
HASH_LEN = 40  # %C: a SHA-1 in hex of local host, remote host, port and user
TEMP_SUFFIX = 17


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
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={directory}/%C",
            "-o", f"ControlPersist={CONTROL_PERSIST}"]


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


def start_master(config: Config, host: str) -> Started | None:
    """`ssh -f -N`: a master that goes to the background once authenticated."""
    try:
        return start(_ssh(config, host, "-f", "-N"))
    except CommandFailed as exc:
        LOG.warning("cannot start an SSH master to %s: %s", host, exc)
        return None


class MasterKeeper(threading.Thread):
    """The daemon's background thread keeping an SSH master up to every peer.

    Never blocks the daemon's cycle: it only reads the current host list through `hosts`.
    Every `every` seconds, a master that answers `ssh -O check` is left alone (the check
    keeps it from expiring); a missing or dead one is started again (`ssh -f -N`), bounded
    by ConnectTimeout, so an unreachable peer costs one attempt per round.
    """

    def __init__(self, config: Callable[[], Config], hosts: Callable[[], Sequence[str]],
                 stop: threading.Event, every: float = KEEP_EVERY) -> None:
        super().__init__(daemon=True, name="ssh-masters")
        self.config = config  # read each round: a reloaded configuration applies at once
        self.hosts = hosts
        self.stop_event = stop
        self.every = every
        self.starting: dict[str, tuple[float, Started]] = {}

    def keep(self) -> None:
        """One round: check every peer's master, start the missing ones."""
        config = self.config()
        if not control_options(config):
            return
        for host, (at, started) in list(self.starting.items()):
            if started.finished():  # the foreground ssh ended: the master is up or failed
                started.close()
                del self.starting[host]
            elif time.monotonic() - at > self.every:  # stuck (ConnectTimeout bounds it)
                started.kill()
                del self.starting[host]
        for host in dict.fromkeys(h for h in self.hosts() if h):
            if self.stop_event.is_set():
                return
            if host in self.starting or master_alive(config, host):
                continue
            master = start_master(config, host)
            if master is not None:
                self.starting[host] = (time.monotonic(), master)

    def run(self) -> None:
        last_hosts: list[str] = []
        last_round = float("-inf")
        while True:
            hosts = list(self.hosts())
            # a round at once for a new peer list (the first one included), else every `every`
            if hosts != last_hosts or time.monotonic() - last_round >= self.every:
                last_hosts, last_round = hosts, time.monotonic()
                try:
                    self.keep()
                except Exception as exc:  # a bad round must not end the thread
                    LOG.warning("keeping SSH masters: %s", exc)
            if self.stop_event.wait(HOSTS_EVERY):
                break
        for _, started in self.starting.values():
            started.kill()
