"""Runs helper programs from argument lists, never through a shell, with no stray privileges.

Under the systemd unit this process holds ambient CAP_NET_ADMIN and CAP_NET_RAW, and every
child would inherit them: ssh (whose ProxyCommand comes from a file postgres can edit),
repmgr, fence_command. Only the privileged network actions (`ip address add/del`, `arping`)
need them, so every other child starts with the ambient and inheritable sets cleared.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from repmgr_vip.core.errors import CommandFailed

if TYPE_CHECKING:
    from repmgr_vip.adapters.early import EarlyChild

PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _load_libc() -> ctypes.CDLL | None:
    """glibc by its soname first: ctypes.util.find_library runs `ldconfig -p` (10-20 ms of
    every hook's and every remote release's start-up, on a failover's critical path)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        pass
    from ctypes.util import find_library

    try:
        return ctypes.CDLL(find_library("c"), use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def _capability_dropper() -> Callable[[], None] | None:
    """A preexec_fn that clears the child's ambient and inheritable capabilities.

    Everything is prepared before fork; the child only makes three system calls. Without
    ambient capabilities, exec of an ordinary binary by a non-root user yields no capabilities.
    """
    libc = _LIBC
    if libc is None:
        return None
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    prctl, capget, capset = libc.prctl, libc.capget, libc.capset

    def drop() -> None:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        if capget(ctypes.byref(header), data) == 0:
            data[0].inheritable = 0
            data[1].inheritable = 0
            capset(ctypes.byref(header), data)

    return drop


class ProgramNotFound(CommandFailed):
    """The program to run does not exist (callers may name the setting that points at it)."""


def _not_found(argv: Sequence[str]) -> CommandFailed:
    return ProgramNotFound(f"{argv[0]} not found; install it or set its path in [commands]")


def run(
    argv: Sequence[str], *, timeout: float, input_text: str | None = None,
    privileged: bool = False, env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs argv to completion; a missing binary or a hang becomes one clear CommandFailed.

    privileged=True keeps this process's capabilities for the child: only for the network
    actions (`ip address add/del`, `arping`) in direct mode.
    """
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            env=env,
            preexec_fn=None if privileged else _capability_dropper(),
        )
    except FileNotFoundError as exc:
        raise _not_found(argv) from exc
    except PermissionError as exc:
        raise CommandFailed(f"{argv[0]} cannot be run ({exc.strerror}); fix its path "
                            "or permissions") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{describe(argv)} did not finish within {timeout:g} s") from exc


class Child(Protocol):
    """What Started needs of a child: a Popen, or one spawned before subprocess loaded."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class Adopted:
    """A child the promote hook's quick start spawned (adapters/early.py), by its pid: the
    calls Started makes of a Popen, with Popen's return codes (-N: killed by signal N)."""

    def __init__(self, argv: tuple[str, ...], pid: int) -> None:
        self.argv = argv
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(list(self.argv), timeout or 0.0)
            time.sleep(0.005)
        return code

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


# children spawned by the quick start, by command line, until start() is asked for one
_ADOPTABLE: dict[tuple[str, ...], tuple[int, int]] = {}


def adopt(children: Iterable[EarlyChild]) -> None:
    """Hands start() the quick start's children."""
    for argv, pid, output in children:
        _ADOPTABLE[argv] = (pid, output)


def stop_unadopted() -> None:
    """Kills and reaps the quick start's children nobody asked start() for (a command line
    from an older configuration): no stray ssh outlives the hook."""
    while _ADOPTABLE:
        argv, (pid, output) = _ADOPTABLE.popitem()
        child = Adopted(argv, pid)
        child.kill()
        child.wait()
        os.close(output)


@dataclass
class Started:
    """A child running in the background with stdout and stderr in an anonymous file.

    A file, not a pipe: if the caller stops reading (or exits), the child must not die of
    SIGPIPE, and a daemonizing child that keeps the descriptor cannot make anyone hang.
    early: started by the quick start, before this process could build the command line.
    """

    argv: tuple[str, ...]
    process: Child
    output: IO[bytes] = field(repr=False)
    early: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def finished(self) -> bool:
        return self.process.poll() is not None

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; CommandFailed if it is still running after `timeout` seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise CommandFailed(
                f"{describe(self.argv)} did not finish within {timeout:g} s") from exc

    def output_text(self) -> str:
        """Everything the child wrote so far (stdout and stderr interleaved)."""
        if self.output.closed:
            return ""
        self.output.seek(0)
        return self.output.read().decode(errors="replace")

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()
        self.close()

    def close(self) -> None:
        self.output.close()


def start(
    argv: Sequence[str], *, privileged: bool = False, env: Mapping[str, str] | None = None,
    new_session: bool = True,
) -> Started:
    """Starts argv without waiting; CommandFailed if it cannot be started at all.

    The same command line, started already by the quick start, is that child (adopt)."""
    plain = not privileged and env is None and new_session  # as the quick start spawns
    early = _ADOPTABLE.pop(tuple(argv), None) if plain else None
    if early is not None:
        pid, fd = early
        return Started(tuple(argv), Adopted(tuple(argv), pid), os.fdopen(fd, "w+b"), early=True)
    output = tempfile.TemporaryFile()  # noqa: SIM115 - closed by Started
    try:
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            env=env, start_new_session=new_session,
            preexec_fn=None if privileged else _capability_dropper(),
        )
    except FileNotFoundError as exc:
        output.close()
        raise _not_found(argv) from exc
    except PermissionError as exc:
        output.close()
        raise CommandFailed(f"{argv[0]} cannot be run ({exc.strerror}); fix its path "
                            "or permissions") from exc
    return Started(tuple(argv), process, output)


def popen_text(
    argv: Sequence[str], *, privileged: bool, stdout: int | None, stderr: int | None,
    new_session: bool = False, stdin: int | None = subprocess.DEVNULL,
) -> subprocess.Popen[str]:
    """A Popen with text pipes, for the callers that must signal or stream a child."""
    try:
        return subprocess.Popen(
            list(argv), stdin=stdin, stdout=stdout, stderr=stderr, text=True,
            start_new_session=new_session,
            preexec_fn=None if privileged else _capability_dropper(),
        )
    except FileNotFoundError as exc:
        raise _not_found(argv) from exc


def read_line(child: subprocess.Popen[str], deadline: float) -> str:
    """The child's next line on stdout, stripped ("" if it ended or stayed silent until
    `deadline`, monotonic): for the root helpers that answer one line per order."""
    import select
    import time

    stdout = child.stdout
    if stdout is None:
        return ""
    try:
        if not select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return ""
        return stdout.readline().strip()
    except (OSError, ValueError):
        return ""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed daemon lingers as one until reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def describe(argv: Sequence[str]) -> str:
    """A readable rendering of a command for messages (not for execution)."""
    return " ".join(argv)


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def start_detached(argv: Sequence[str]) -> int:
    """Starts a process that outlives its caller (own session, no inherited stdio); its pid.

    The child is reaped by init once the caller (a short-lived hook) exits.
    """
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                            preexec_fn=_capability_dropper())
    return proc.pid


def start_detached_child(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """A background child whose output nobody reads (the caller only wants its status)."""
    try:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_capability_dropper())
    except OSError as exc:
        raise _not_found(argv) from exc
