"""Commands on other nodes over SSH, the way repmgr itself does it.

The system `ssh` with BatchMode (never a password prompt in a hook) plus repmgr.conf's
ssh_options. ssh hands the remote command to the remote shell as one string, so every
argument is quoted with shlex.quote: cluster data never becomes shell syntax.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from repmgr_vip.config import Config
from repmgr_vip.errors import CommandFailed
from repmgr_vip.process import run


@dataclass(frozen=True)
class RemoteResult:
    host: str
    returncode: int  # 255: ssh itself failed (unreachable, auth); -1: timed out here
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def ssh_argv(config: Config, host: str, remote_argv: Sequence[str]) -> list[str]:
    return [
        config.commands.ssh,
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={config.fencing.ssh_connect_timeout}",
        *shlex.split(config.repmgr.ssh_options),
        "--",
        host,
        shlex.join(remote_argv),
    ]


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
    """A remote command running in the background.

    Output goes to an anonymous file rather than a pipe: if the caller stops waiting and exits,
    ssh must not die of SIGPIPE and take the remote command down with it.
    """

    host: str
    process: subprocess.Popen[bytes]
    output: IO[bytes]

    def finished(self) -> bool:
        return self.process.poll() is not None

    def result(self) -> RemoteResult:
        code = self.process.wait()
        self.output.seek(0)
        text = self.output.read().decode(errors="replace")
        self.output.close()
        return RemoteResult(self.host, code, text, text)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.output.close()


def start_remote(config: Config, host: str, remote_argv: Sequence[str]) -> RemoteSession:
    """Starts a remote command without waiting, for callers that race it against a probe."""
    output = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call; closed by the session
    process = subprocess.Popen(
        ssh_argv(config, host, remote_argv), stdin=subprocess.DEVNULL,
        stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
    )
    return RemoteSession(host, process, output)


def remote_vip_command(config: Config, node_name: str, node_id: int, *args: str) -> list[str]:
    """`repmgr-vip -c <that node's config> ARGS` as it must run on another node."""
    return [config.remote.command, "-c", config.remote.config_for(node_name, node_id), *args]
