"""Running commands in namespaces as a given user, and ending processes for sure."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lab.settings import DEFAULT_PATH, IP_BIN, PG_USER, CommandError, T, log


def _postgres_ids() -> tuple[int, int]:
    """uid/gid of the postgres account (needed to chown the lab's files)."""
    entry = pwd.getpwnam(PG_USER)
    return entry.pw_uid, entry.pw_gid


def _write(path: Path, text: str, *, mode: int = 0o644, owner: str = PG_USER) -> None:
    """Write a file and give it to `owner`, so postgres can read or rewrite it."""
    path.write_text(text)
    os.chmod(path, mode)
    if owner != "root":
        uid, gid = _postgres_ids()
        os.chown(path, uid, gid)


def _mkdir(path: Path, *, mode: int = 0o755, owner: str = PG_USER) -> None:
    """mkdir -p with an explicit mode and owner (umask must not decide)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner != "root":
        uid, gid = _postgres_ids()
        os.chown(path, uid, gid)


def _base_env(user: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    """A clean environment: the caller's PG* variables must not leak into the lab."""
    env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "TZ": "UTC"}
    if user == "root":
        env["HOME"] = "/root"
    else:
        home = pwd.getpwnam(user).pw_dir
        env.update(HOME=home, USER=user, LOGNAME=user)
    if extra:
        env.update(extra)
    return env


def _killpg(pid: int) -> None:
    """Kill a process group started with start_new_session (runuser forks)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_cmd(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output in files instead of pipes.

    Why files: daemons started by the command (postmaster, repmgrd, sshd) may
    inherit stdout; with a pipe we would wait for them forever.
    """
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        timed_out = False
        try:
            if input is not None:
                assert proc.stdin is not None
                proc.communicate(input.encode(), timeout=timeout)
            else:
                proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _killpg(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    log.debug("%.3fs rc=%s %s", time.monotonic() - started, proc.returncode, shlex.join(argv))
    if timed_out:
        raise subprocess.TimeoutExpired(list(argv), timeout, output=stdout, stderr=stderr)
    rc = proc.returncode
    if check and rc != 0:
        raise CommandError(rc, list(argv), stdout, stderr)
    return subprocess.CompletedProcess(list(argv), rc, stdout, stderr)


def _ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """Run iproute2 from the root namespace (use `-n NS` to reach a namespace)."""
    return run_cmd([IP_BIN, *args], check=check, timeout=timeout, env=_base_env("root", None))


def list_netns() -> list[str]:
    """Names of all network namespaces (ip netns list)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    """Processes whose network namespace is `ns` (`ip netns pids`)."""
    res = _ip("netns", "pids", ns, check=False)
    if res.returncode != 0:
        return []
    return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _proc_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (PID 1 here reaps late)."""
    return _proc_state(pid) not in ("", "Z", "X")


def _proc_comm(pid: int) -> str:
    """The process' command name, "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send a signal to many pids, ignoring those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_dead(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until the pids are gone; return the survivors."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [p for p in pending if _proc_alive(p)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return pending


PR_SET_CHILD_SUBREAPER = 36
REAPED_NAMES = frozenset({"postgres", "postmaster", "repmgrd", "sshd"})
_reaper_lock = threading.Lock()
_reaper_started = False


def _our_children() -> list[int]:
    """Pids of this process' children (own and adopted), from /proc."""
    kids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            kids += [int(tok) for tok in (task / "children").read_text().split()]
    return kids


def _proc_state(pid: int) -> str:
    """One-letter process state, "" if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]


def reap_zombies() -> list[int]:
    """Reap zombie lab daemons that were adopted by this process; return their pids."""
    reaped: list[int] = []
    for pid in _our_children():
        if _proc_state(pid) == "Z" and _proc_comm(pid) in REAPED_NAMES:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped.append(pid)
    return reaped


def _reaper_loop() -> None:
    """Background reaping, so zombies never block a restart."""
    while True:
        with contextlib.suppress(Exception):
            reap_zombies()
        time.sleep(0.1)


def enable_reaper() -> bool:
    """Make this process a child subreaper with a reaping thread (once per process)."""
    global _reaper_started
    with _reaper_lock:
        if _reaper_started:
            return True
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                return False
        except (OSError, AttributeError):
            return False
        threading.Thread(target=_reaper_loop, name="lab-reaper", daemon=True).start()
        _reaper_started = True
        return True


def _settle_dead(pids: Iterable[int], timeout: float) -> list[int]:
    """After SIGKILL: wait until the pids are gone (reaping those we can).

    Returns the pids still present (alive or zombie) when the timeout hit.
    """
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        reap_zombies()
        pending = [p for p in pending if _proc_state(p) != ""]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.02)


def _read_pid(path: Path) -> int | None:
    """First line of a pid file as an int, None if missing or garbage."""
    try:
        first = path.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return int(first) if first.isdigit() else None


def _has_pid(path: Path) -> bool:
    """A pid file with a number in it exists (daemon finished starting)."""
    return _read_pid(path) is not None


def _parallel(fn: Callable[[T], object], items: Sequence[T]) -> None:
    """Run fn over items in threads and re-raise the first failure."""
    if not items:
        return
    if len(items) == 1:
        fn(items[0])
        return
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        for fut in [pool.submit(fn, item) for item in items]:
            fut.result()
