"""One actor on the VIP per node: hooks, the daemon and manual commands take this lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from repmgr_vip.adapters.statefiles import fix_owner_and_mode
from repmgr_vip.core.errors import CommandFailed, ConfigError


class LockBusy(CommandFailed):
    """Another repmgr-vip action holds the lock longer than the caller wants to wait."""


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def open_lock_file(path: Path) -> int:
    """Opens (creating if needed) the lock file so that every later user can open it too.

    Whoever creates it first, root with umask 077 included, it ends up 0644 and owned by the
    state directory's owner; a root run also repairs a root-owned 0600 file left by an older
    version. flock needs no write access, so a read-only open is enough for other users.
    """
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
        except PermissionError:  # owned by another user: flock works on a read-only fd
            fd = os.open(path, os.O_RDONLY | flags)
    except PermissionError as exc:
        raise ConfigError(
            f"cannot open lock file {path} as {_user_name()} ({exc.strerror}): it was created "
            f"by another user; run `chown {_user_name()} {path}` or remove it "
            "(repmgr-vip run as root repairs it)"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"cannot open lock file {path} ({exc.strerror}); "
            "set state_dir to a directory this user can write (and no symlink as lock file)"
        ) from exc
    try:
        fix_owner_and_mode(fd, path)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(
            f"cannot give lock file {path} mode 0644 and the owner of {path.parent} "
            f"({exc.strerror}); remove it (repmgr-vip creates it again)"
        ) from exc
    return fd


@contextmanager
def vip_lock(path: Path, timeout: float) -> Iterator[None]:
    """Holds an exclusive flock; the kernel frees it if the holder dies, so no stale locks."""
    fd = open_lock_file(path)
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
