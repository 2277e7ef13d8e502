"""Commands on other nodes over SSH, the way repmgr itself does it.

The system `ssh` with BatchMode (never a password prompt in a hook) plus repmgr.conf's
ssh_options. ssh hands the remote command to the remote shell as one string, so every
argument is quoted with shlex.quote: cluster data never becomes shell syntax.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from repmgr_vip.adapters import sshmux
from repmgr_vip.adapters.process import Started, run, start
from repmgr_vip.config.schema import Config
from repmgr_vip.core.errors import CommandFailed
from repmgr_vip.core.model import RELEASED_FROM_MAC

# the MAC line of `release` over ssh (model.RELEASED_FROM_MAC)
_REMOTE_MAC = re.compile(rf"^{RELEASED_FROM_MAC} ([0-9a-f]{{2}}(?::[0-9a-f]{{2}}){{5}})$", re.M)

# ssh gives up on a peer that stops answering after about ServerAliveInterval x CountMax
# seconds, so a session abandoned after its caller's deadline does not linger for hours.
SERVER_ALIVE_INTERVAL = 1
SERVER_ALIVE_COUNT_MAX = 3


@dataclass(frozen=True)
class RemoteResult:
    host: str
    returncode: int  # 255: ssh itself failed (unreachable, auth); -1: timed out here
    stdout: str
    stderr: str
    macs: tuple[str, ...] = ()  # the node's VIP interface MAC, when it answered over a link

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def ssh_options(config: Config) -> list[str]:
    """Every option of our ssh calls; repmgr.conf's ssh_options before the key exchange
    preference and the multiplexing options, so a DBA's own KexAlgorithms, ControlPath (or
    ControlPath=none) wins (ssh keeps the first value it is given; see sshmux)."""
    kex = config.fencing.ssh_kex_first
    return [
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={config.fencing.ssh_connect_timeout}",
        "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
        "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}",
        *shlex.split(config.repmgr.ssh_options),
        *(["-o", f"KexAlgorithms=^{kex}"] if kex else []),
        *sshmux.control_options(config),
    ]


def ssh_argv(config: Config, host: str, remote_argv: Sequence[str]) -> list[str]:
    return [config.commands.ssh, *ssh_options(config), "--", host, shlex.join(remote_argv)]


def run_remote(
    config: Config, host: str, remote_argv: Sequence[str], *, timeout: float | None = None
) -> RemoteResult:
    limit = timeout if timeout is not None else config.fencing.ssh_command_timeout
    try:
        result = run(ssh_argv(config, host, remote_argv), timeout=limit)
    except CommandFailed as exc:
        return RemoteResult(host, -1, "", str(exc))
    return RemoteResult(host, result.returncode, result.stdout, result.stderr)


@dataclass
class RemoteSession:
    """A remote command running in the background (see process.Started for why a file).

    `started` is None when ssh could not even be started (missing binary): the session is
    then finished at once and fails with `failure` as its message.
    """

    host: str
    started: Started | None
    failure: str = ""

    @property
    def early(self) -> bool:
        """ssh was started by the promote hook's quick start (adapters/early.py)."""
        return self.started is not None and self.started.early

    def finished(self) -> bool:
        return self.started is None or self.started.finished()

    def result(self) -> RemoteResult:
        if self.started is None:
            return RemoteResult(self.host, -1, "", self.failure)
        code = self.started.wait()
        text = self.started.output_text()
        self.started.close()
        macs = tuple(_REMOTE_MAC.findall(text)) if code == 0 else ()
        return RemoteResult(self.host, code, text, text, macs)

    def kill(self) -> None:
        if self.started is not None:
            self.started.kill()


def start_remote(config: Config, host: str, remote_argv: Sequence[str]) -> RemoteSession:
    """Starts a remote command without waiting, for callers that race it against a probe."""
    try:
        return RemoteSession(host, start(ssh_argv(config, host, remote_argv)))
    except CommandFailed as exc:
        return RemoteSession(host, None, str(exc))


def remote_vip_command(config: Config, node_name: str, node_id: int, *args: str) -> list[str]:
    """`repmgr-vip -c <that node's config> ARGS` as it must run on another node."""
    return [config.remote.command, "-c", config.remote.config_for(node_name, node_id), *args]
