"""Runs helper programs from argument lists, never through a shell."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from repmgr_vip.errors import CommandFailed


def run(
    argv: Sequence[str], *, timeout: float, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs argv to completion; a missing binary or a hang becomes one clear CommandFailed."""
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(
            f"{argv[0]} not found; install it or set its path in [commands]"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{describe(argv)} did not finish within {timeout:g} s") from exc


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
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    return proc.pid


def start_detached_child(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """A background child whose output nobody reads (the caller only wants its status)."""
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
