"""The old primary's release, started by the promote hook's quick start (no daemon running).

Without a daemon, a failover's first remote step is a fresh ssh to the old primary, and the
full CLI takes about 100 ms (its imports, its configuration) before it can start one: client
outage. So a standby keeps on disk the exact ssh command lines its promote hook's fencing
round starts first, the releases on the nodes its node list names primary. The hooks that
keep the node list (start-repmgrd, follow) write them (write_plan). The quick start, finding
no daemon, starts them at once (start_releases), as process.start would; the full CLI's
round adopts each child whose command line is exactly one it builds itself (process.start),
and a child it did not build is stopped when the hook ends (process.stop_unadopted). A plan
left from an older configuration or node list costs one wasted release, never a wrong one:
only identical command lines are adopted, and the round asks every node as always.

The plan is a command line this user's hook runs, so it is trusted only as far as the state
directory is: a plain file owned by this user, in a directory only this user or root may
write; and only while this process has no capabilities its children could inherit
(process.start drops them, posix_spawn cannot). Standard library only, and of it only what
the quick start loads anyway: this runs before the site directories are even on sys.path.
"""

from __future__ import annotations

import os
import stat

from repmgr_vip.config import statepaths
from repmgr_vip.core.jsonline import dumps, loads

TYPE_CHECKING = False  # typing costs the hook milliseconds
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    # a child the quick start spawned: its command line, pid and output file descriptor
    EarlyChild = tuple[tuple[str, ...], int, int]

MAX_PLAN = 64 * 1024


def write_plan(state_dir: Path, config_path: Path, argvs: Sequence[Sequence[str]]) -> None:
    """Keeps the command lines the quick start may run at once; none: no plan at all.

    Never as root: the lines name this user's ssh socket directory, and the hooks run as
    the user repmgr runs them as (a root run by hand leaves the plan as it was)."""
    import contextlib

    from repmgr_vip.adapters import statefiles

    if os.geteuid() == 0:
        return
    path = statepaths.early_release_plan(state_dir)
    if not argvs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    statefiles.write_atomic(path, dumps({
        "config": str(config_path), "control": str(statepaths.control_socket(state_dir)),
        "release": [list(argv) for argv in argvs]}))


def start_releases(control: str, config_arg: str) -> list[EarlyChild]:
    """Starts the plan's releases for the hook line `-c config_arg promote --control control`;
    [] when there is no plan, or one that cannot be trusted or is not for this hook line."""
    state_dir, name = os.path.split(control)
    if name != statepaths.CONTROL_SOCKET or not _only_ours(state_dir) or _capabilities():
        return []
    plan = _read_plan(os.path.join(state_dir, statepaths.EARLY_RELEASE))
    if plan is None or plan.get("config") != config_arg or plan.get("control") != control:
        return []
    releases = plan.get("release")
    started: list[EarlyChild] = []
    for argv in releases if isinstance(releases, list) else []:
        if (isinstance(argv, list) and argv and all(isinstance(word, str) for word in argv)
                and os.path.isabs(argv[0])):
            child = _start(argv)
            if child is not None:
                started.append(child)
    return started


def anonymous_output() -> int:
    """An unnamed file for a child's output (never a pipe a child could block on); OSError."""
    return os.open(os.environ.get("TMPDIR") or "/tmp", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC,
                   0o600)


def spawn(argv: Sequence[str], output: int, *, env: Mapping[str, str] | None = None,
          setsid: bool = False, search: bool = False) -> int:
    """posix_spawn with stdin from /dev/null, stdout and stderr into `output`, and none of
    this process's other inheritable descriptors (what Popen's close_fds does); the pid.
    search: look argv[0] up in PATH. OSError if it cannot be started."""
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, output, 1), (os.POSIX_SPAWN_DUP2, output, 2),
        *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited())]
    run = os.posix_spawnp if search else os.posix_spawn
    return run(argv[0], list(argv), os.environ if env is None else env,
               file_actions=actions, setsid=setsid)


def _start(argv: list[str]) -> EarlyChild | None:
    try:
        output = anonymous_output()
    except OSError:
        return None
    if output < 3:  # stdout or stderr closed: dup2 onto itself would keep it close-on-exec
        os.close(output)
        return None
    try:
        pid = spawn(argv, output, setsid=True)
    except OSError:
        os.close(output)
        return None
    return tuple(argv), pid, output


def _inherited() -> list[int]:
    """This process's descriptors above stderr that a child would inherit (repmgrd's)."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return found


def _only_ours(directory: str) -> bool:
    """Only this user or root may change what the directory holds."""
    try:
        info = os.stat(directory)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid in (os.geteuid(), 0)
            and not info.st_mode & 0o022)


def _capabilities() -> bool:
    """Whether a child could inherit capabilities from this process (ambient or inheritable
    set non-empty, as under the daemon's systemd unit); then only process.start runs it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return any(int(fields[name], 16) for name in ("CapInh", "CapAmb"))
    except (OSError, ValueError, KeyError):
        return True


def _read_plan(path: str) -> dict[str, object] | None:
    """The plan, if it is a plain file of this user that nobody else may write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid()
                or info.st_mode & 0o022 or info.st_size > MAX_PLAN):
            return None
        plan = loads(os.read(fd, MAX_PLAN))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return plan if isinstance(plan, dict) else None
