"""One actor on the VIP per node: hooks, the daemon and manual commands take this lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from repmgr_vip.errors import CommandFailed, ConfigError


class LockBusy(CommandFailed):
    """Another repmgr-vip action holds the lock longer than the caller wants to wait."""


@contextmanager
def vip_lock(path: Path, timeout: float) -> Iterator[None]:
    """Holds an exclusive flock; the kernel frees it if the holder dies, so no stale locks."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
        except PermissionError:  # created by another user (root ran a command): flock needs
            fd = os.open(path, os.O_RDONLY | flags)  # no write access
    except OSError as exc:
        raise ConfigError(
            f"cannot open lock file {path} ({exc.strerror}); "
            "set state_dir to a directory this user can write"
        ) from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"another repmgr-vip action holds {path} for more than {timeout:g} s; "
                        "wait for it or find it with `fuser -v " + str(path) + "`"
                    ) from None
                time.sleep(0.02)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
