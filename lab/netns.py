"""Namespaces and runs: per-run prefixes, work directories, and cleanup of a crashed run."""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path

from lab.procs import (
    _base_env,
    _ip,
    _proc_comm,
    _signal,
    _wait_dead,
    list_netns,
    netns_pids,
    reap_zombies,
    run_cmd,
)
from lab.settings import (
    IPCRM,
    IPCS,
    PREFIX_RE,
    SUDOERS_DIR,
    SUDOERS_PREFIX,
    WORKDIR_PREFIX,
    WORKDIR_ROOT,
    LabError,
)


def _prefix_namespaces(prefix: str, names: Iterable[str]) -> list[str]:
    """The namespaces that belong to run `prefix` (exact naming scheme only)."""
    own = re.compile(rf"^{re.escape(prefix)}-(br|cl|w|n[0-9]+)$")
    return [n for n in names if own.match(n)]


def workdir_for(prefix: str) -> Path:
    """Where a run keeps every file postgres needs (/root is mode 700)."""
    return WORKDIR_ROOT / f"{WORKDIR_PREFIX}{prefix}"


def sudoers_file_for(prefix: str) -> Path:
    """The sudoers drop-in a run may install."""
    return SUDOERS_DIR / f"{SUDOERS_PREFIX}{prefix}"


def cleanup(prefix: str) -> None:
    """Remove every trace of run `prefix`: processes, namespaces, files.

    Idempotent and independent of any Lab object, so a crashed run can be
    cleaned from another process (`python3 -m lab down --prefix P`).
    """
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"bad lab prefix {prefix!r}")
    namespaces = _prefix_namespaces(prefix, list_netns())
    pids: set[int] = set()
    for ns in namespaces:
        pids.update(netns_pids(ns))
    if pids:
        # Wake frozen processes, ask postmasters for an immediate shutdown so
        # they release shared memory, then kill whatever is left.
        _signal(pids, signal.SIGCONT)
        postmasters = [p for p in pids if _is_postmaster(p)]
        _signal(postmasters, signal.SIGQUIT)
        _wait_dead(postmasters, 2.0)
    for _ in range(20):
        pids = set()
        for ns in namespaces:
            pids.update(netns_pids(ns))
        if not pids:
            break
        _signal(pids, signal.SIGKILL)
        _wait_dead(pids, 1.0)
    reap_zombies()
    _remove_orphan_shm(workdir_for(prefix))
    for ns in namespaces:
        res = _ip("netns", "del", ns, check=False)
        if res.returncode != 0 and ns in list_netns():
            raise LabError(f"cannot delete namespace {ns}: {res.stderr.strip()}")
    with contextlib.suppress(FileNotFoundError):
        sudoers_file_for(prefix).unlink()
    _remove_rejoin_logs(prefix)
    workdir = workdir_for(prefix)
    if workdir.exists():
        shutil.rmtree(workdir, ignore_errors=True)
        if workdir.exists():
            shutil.rmtree(workdir)


def _remove_rejoin_logs(prefix: str) -> None:
    """Delete this run's /tmp/node-rejoin.*.log files.

    `repmgr standby switchover` logs the remote `node rejoin` into a hard-coded
    /tmp path; the run's workdir in the text (pg_ctl -D ...) tells whose it is.
    """
    marker = f"{workdir_for(prefix)}/"
    for path in Path("/tmp").glob("node-rejoin.*.log"):
        with contextlib.suppress(OSError):
            if marker in path.read_text(errors="replace"):
                path.unlink()


def _remove_orphan_shm(workdir: Path) -> None:
    """Drop SysV segments a kill -9'd postmaster of this run left behind.

    Only a segment whose id and key match the run's postmaster.pid and that no
    process is attached to is removed, so other runs are never touched.
    """
    wanted: set[tuple[int, int]] = set()
    for pidfile in workdir.glob("*/data/postmaster.pid"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            key, shmid = pidfile.read_text().splitlines()[6].split()[:2]
            wanted.add((int(key), int(shmid)))
    if not wanted:
        return
    res = run_cmd([IPCS, "-m"], check=False, env=_base_env("root", None))
    for line in res.stdout.splitlines():
        cols = line.split()
        if len(cols) < 6 or not cols[0].startswith("0x") or not cols[1].isdigit():
            continue
        if (int(cols[0], 16), int(cols[1])) in wanted and cols[5] == "0":
            run_cmd([IPCRM, "-m", cols[1]], check=False, env=_base_env("root", None))


def _is_postmaster(pid: int) -> bool:
    """A postgres process whose parent is not postgres: the postmaster."""
    if _proc_comm(pid) != "postgres":
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    ppid = int(stat.rsplit(")", 1)[-1].split()[1])
    return _proc_comm(ppid) != "postgres"


def list_runs() -> dict[str, list[str]]:
    """Prefixes of lab runs that have namespaces or a workdir, with their namespaces."""
    runs: dict[str, list[str]] = {}
    pattern = re.compile(r"^([a-z][a-z0-9]{1,9})-(br|cl|w|n[0-9]+)$")
    for ns in list_netns():
        m = pattern.match(ns)
        if m:
            runs.setdefault(m.group(1), []).append(ns)
    for path in WORKDIR_ROOT.glob(f"{WORKDIR_PREFIX}*"):
        prefix = path.name[len(WORKDIR_PREFIX) :]
        if PREFIX_RE.match(prefix):
            runs.setdefault(prefix, [])
    return runs


def fresh_prefix() -> str:
    """'rv' + 4 hex chars, not used by any namespace or workdir right now."""
    existing = set(list_runs())
    for _ in range(100):
        prefix = "rv" + secrets.token_hex(2)
        if prefix not in existing and not workdir_for(prefix).exists():
            return prefix
    raise LabError("could not find a free lab prefix")


def _mac_for(prefix: str, last_octet: int) -> str:
    """A stable, locally administered MAC per run and host (readable in dumps)."""
    digest = hashlib.sha1(prefix.encode()).digest()
    return f"02:{digest[0]:02x}:{digest[1]:02x}:00:00:{last_octet:02x}"
