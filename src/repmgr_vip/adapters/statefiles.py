"""One safe way to touch the files repmgr-vip keeps in state_dir (their names: statepaths).

The state directory is shared by postgres (hooks, the daemon) and root (a DBA running a
command by hand). A file created by root with umask 077 must not lock postgres out, a symlink
planted in the directory must not redirect a write, and a full disk must not leave half a
file behind. So every write goes through `write_atomic`, every read through `read_text`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import TextIO

FILE_MODE = 0o644
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def directory_owner(path: Path) -> tuple[int, int]:
    """(uid, gid) of the directory holding `path`: whoever must be able to use the file."""
    info = os.stat(path.parent)
    return info.st_uid, info.st_gid


def fix_owner_and_mode(fd: int, path: Path) -> None:
    """Gives an open state file mode 0644 and, when we are root, the directory's owner.

    Root runs (a DBA by hand, with any umask) must leave files postgres can still open.
    A non-root process can only fix files it owns; others are left alone.
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        # a hard link to another file (or a FIFO, a device) planted in the directory: giving
        # it to postgres would hand over whatever it points at
        raise OSError(errno.EPERM, f"{path} is not a plain file with a single link")
    if os.geteuid() == 0:
        uid, gid = directory_owner(path)
        if (info.st_uid, info.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
    elif info.st_uid != os.geteuid():
        return
    if info.st_mode & 0o7777 != FILE_MODE:
        os.fchmod(fd, FILE_MODE)


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Replaces `path` with `text` completely or not at all; never follows a symlink.

    The temporary file is created exclusively (O_EXCL|O_NOFOLLOW) in the same directory,
    synced, then renamed over `path` (a symlink at `path` is replaced, not followed). On any
    error the temporary file is removed and the OSError raised again. durable=False skips
    the syncs: for a file rewritten every period that a crash may leave a period old.
    """
    # os.urandom, not secrets: the name only has to be unlikely (O_EXCL refuses a clash), and
    # secrets loads hashlib and OpenSSL, ~4 ms of every hook's start-up
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, FILE_MODE)
    try:
        try:
            fix_owner_and_mode(fd, tmp)
            data = text.encode("utf-8")
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    with contextlib.suppress(OSError):  # make the rename itself durable; best effort
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_text(path: Path) -> str:
    """The file's text; a symlink raises OSError (ELOOP) instead of being followed."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        return handle.read().decode("utf-8")


def open_append(path: Path) -> TextIO:
    """Opens a log file for appending, line-buffered, never through a symlink.

    A file this call creates gets mode 0644 and, when we are root, the directory's owner,
    so postgres can still write it; an existing file keeps the owner the DBA gave it.
    """
    flags = os.O_WRONLY | os.O_APPEND | _NOFOLLOW
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        fd = os.open(path, flags)
    else:
        with contextlib.suppress(OSError):
            fix_owner_and_mode(fd, path)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


def remove(path: Path) -> bool:
    """Removes the file (a symlink itself, never its target); False if it was not there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


def marker_text(reason: str) -> str:
    """The self-fence marker records when, on a clock that a wall-clock step cannot move."""
    return json.dumps({"boot_id": _boot_id(), "boottime": time.clock_gettime(time.CLOCK_BOOTTIME),
                       "reason": reason}) + "\n"


def marker_age(path: Path) -> float | None:
    """Seconds since the marker was written; a marker from an earlier boot counts as old."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        return None
    except OSError:
        return float("inf")  # there, but unreadable (a symlink): still a marker
    try:
        data = json.loads(text)
        if data["boot_id"] == _boot_id():
            return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - float(data["boottime"]))
    except (ValueError, KeyError, TypeError):
        pass
    return float("inf")  # unreadable or from another boot: old, but still a marker
