"""A throw-away repmgr/PostgreSQL cluster inside Linux network namespaces.

Why: repmgr-vip moves a virtual IP between real hosts; the only honest test is a
real cluster whose nodes have their own network stacks, ARP and carrier state.
Every node is a network namespace with ``eth0`` plugged into a bridge that
lives in a namespace of its own (never the root namespace, no default route),
so nothing a test does can leak onto a real network.

Standard library only: the lab must run under Debian's /usr/bin/python3 too.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

log = logging.getLogger("tests.lab")

VIP = "192.0.2.115/24"
VIP_IP = "192.0.2.115"
INTERFACE = "eth0"
PG_BIN = "/usr/lib/postgresql/15/bin"
PG_PORT = 5432
SUBNET = "192.0.2.0/24"
CLIENT_IP = "192.0.2.100"
WITNESS_IP = "192.0.2.30"
WITNESS_NODE_ID = 99
# IPv6 inside the lab's namespaces only (documentation prefix, no routes): each host has
# 2001:db8::N beside 192.0.2.N; the kernel's DAD and ndisc_notify as sudo mode needs them.
SUBNET6 = "2001:db8::/64"
VIP6 = "2001:db8::115/64"
VIP6_IP = "2001:db8::115"
PG_USER = "postgres"
REPMGR_USER = "repmgr"
REPMGR_DB = "repmgr"

IP_BIN = "/usr/bin/ip" if Path("/usr/bin/ip").exists() else "/sbin/ip"
RUNUSER = "/usr/sbin/runuser"
SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
ARPING = "/usr/bin/arping"
VISUDO = "/usr/sbin/visudo"
USERMOD = "/usr/sbin/usermod"
PING = "/usr/bin/ping"
SETPRIV = "/usr/bin/setpriv"
SUDO = "/usr/bin/sudo"
MOUNT = "/usr/bin/mount"
UMOUNT = "/usr/bin/umount"
IPCS = "/usr/bin/ipcs"
IPCRM = "/usr/bin/ipcrm"
SYSCTL = "/usr/sbin/sysctl"
SUDOERS_DIR = Path("/etc/sudoers.d")
SUDOERS_PREFIX = "repmgr-vip-lab-"
WORKDIR_ROOT = Path("/tmp")
WORKDIR_PREFIX = "rvlab-"
# No /usr/local: that tree holds odd copies of repmgr on this workplace.
DEFAULT_PATH = f"{PG_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,9}$")


def ipv6_of(ipv4: str) -> str:
    """A lab host's IPv6 address: 192.0.2.N -> 2001:db8::N."""
    return f"2001:db8::{ipv4.rsplit('.', 1)[1]}"


T = TypeVar("T")


class LabError(RuntimeError):
    """Raised when the lab cannot be built or is in an unexpected state."""


class CommandError(subprocess.CalledProcessError):
    """A failed command whose message carries its output (CalledProcessError hides it)."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                tail = str(data)[-2000:].rstrip()
                text += f"\n--- {label} ---\n{tail}"
        return text


@dataclass(frozen=True)
class Node:
    """One host of the lab: a namespace, an address and (usually) a PostgreSQL."""

    name: str
    node_id: int
    netns: str
    ip: str
    mac: str
    dir: Path
    repmgr_conf: Path
    socket_dir: Path
    datadir: Path
    is_witness: bool = False

    @property
    def veth(self) -> str:
        """Name of this node's veth end inside the bridge namespace."""
        return "vw" if self.is_witness else f"v{self.node_id}"

    @property
    def pg_log(self) -> Path:
        """The postmaster's log file (pg_ctl -l)."""
        return self.dir / "postgresql.log"

    @property
    def repmgr_log(self) -> Path:
        """repmgr's and repmgrd's log_file."""
        return self.dir / "repmgr.log"

    @property
    def repmgrd_pid_file(self) -> Path:
        """repmgrd_pid_file from repmgr.conf."""
        return self.socket_dir / "repmgrd.pid"

    @property
    def conninfo(self) -> str:
        """The conninfo repmgr stores for this node."""
        return (
            f"host={self.ip} port={PG_PORT} user={REPMGR_USER} dbname={REPMGR_DB} connect_timeout=2"
        )


# --------------------------------------------------------------------------
# process helpers


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


# ---- zombies ---------------------------------------------------------------
# PID 1 of this workplace's machines (not an init) reaps orphans only a second
# or two late. Meanwhile a kill -9'd postmaster is a zombie, kill(pid, 0) still
# succeeds, and PostgreSQL (like repmgrd with its pid file) refuses to start:
# "another server might be running". So the process that builds labs becomes a
# child subreaper and reaps the lab's daemons itself. Only zombies named like
# lab daemons are reaped: reaping any child would steal subprocess' exit codes.

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
    cleaned from another process (`python3 -m tests.lab down --prefix P`).
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


# Every program the lab, the lab tests, the bench and the demo run, with the Debian 12
# package that provides it. `make setup` installs the Makefile's DEBS; a unit test checks
# that each package named here is in DEBS, so a fresh machine has every one of them.
PREREQUISITES: tuple[tuple[str, str], ...] = (
    *((f"{PG_BIN}/{b}", "postgresql-15") for b in ("initdb", "pg_ctl", "postgres")),
    *((f"{PG_BIN}/{b}", "postgresql-client-15") for b in ("psql", "pg_isready")),
    *((f"{PG_BIN}/{b}", "postgresql-15-repmgr") for b in ("repmgr", "repmgrd")),
    (IP_BIN, "iproute2"),
    (RUNUSER, "util-linux"),
    (SETPRIV, "util-linux"),
    (IPCS, "util-linux"),
    (IPCRM, "util-linux"),
    (SYSCTL, "procps"),  # IPv6 neighbour discovery settings per host
    (MOUNT, "mount"),
    (UMOUNT, "mount"),
    (SSHD, "openssh-server"),
    (SSH, "openssh-client"),
    (SSH_KEYGEN, "openssh-client"),
    (ARPING, "iputils-arping"),
    (PING, "iputils-ping"),
    (SUDO, "sudo"),
    (VISUDO, "sudo"),
    (USERMOD, "passwd"),
    ("/usr/bin/fuser", "psmisc"),  # named by repmgr-vip's lock-busy message
    ("/usr/bin/python3", "python3"),
    ("/usr/bin/git", "git"),  # bench: which commit the figures belong to
)
REPMGR_EXTENSION = ("/usr/share/postgresql/15/extension/repmgr.control", "postgresql-15-repmgr")


def missing_prerequisites() -> list[str]:
    """Why the lab cannot run here (empty list: it can), each with the package to install."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("not running as root")
    missing += [
        f"missing {path}: apt-get install {package}"
        for path, package in PREREQUISITES
        if not os.access(path, os.X_OK)
    ]
    path, package = REPMGR_EXTENSION
    if not Path(path).exists():
        missing.append(f"missing {path}: apt-get install {package}")
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        missing.append("no postgres user: apt-get install postgresql-15")
    return missing


def ensure_postgres_account() -> None:
    """Unlock Debian's postgres account ('!' -> '*'): sshd without PAM refuses '!'.

    '*' still allows no password login; it only stops sshd calling the account locked.
    """
    for attempt in range(5):
        try:
            lines = Path("/etc/shadow").read_text().splitlines()
        except OSError as exc:
            raise LabError(f"cannot read /etc/shadow: {exc}") from exc
        field = next((ln.split(":")[1] for ln in lines if ln.startswith(f"{PG_USER}:")), "")
        if not field.startswith("!"):
            return
        res = run_cmd([USERMOD, "-p", "*", PG_USER], check=False, env=_base_env("root", None))
        if res.returncode == 0:
            return
        time.sleep(0.2 * (attempt + 1))  # another run may hold the shadow lock
    raise LabError("could not unlock the postgres account with usermod -p '*'")


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


def _quote_conf(value: str) -> str:
    """Quote a value for repmgr.conf / postgresql.conf."""
    return "'" + value.replace("'", "''") + "'"


# --------------------------------------------------------------------------
# reading addresses over rtnetlink

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_IFNAME, IFLA_OPERSTATE = 3, 16
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
IF_OPER_DOWN, IF_OPER_LOWERLAYERDOWN = 2, 3
_NLMSGHDR = struct.Struct("=LHHLL")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _rtattrs(data: bytes) -> dict[int, bytes]:
    """Route attributes (type -> payload) of one netlink message body."""
    attrs: dict[int, bytes] = {}
    off = 0
    while off + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, off)
        if length < _RTATTR.size:
            break
        attrs.setdefault(kind, data[off + _RTATTR.size : off + length])
        off += _align4(length)
    return attrs


def _same_ip(a: str, b: str) -> bool:
    """One address however spelled (2001:DB8::1 and 2001:db8:0::1 are the same)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _netlink_socket_in(netns: str) -> socket.socket:
    """An rtnetlink socket that lives in network namespace `netns`.

    A socket stays in the namespace it was created in, so a throw-away thread
    enters the namespace (setns affects only the calling thread), opens it and ends.
    """
    box: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            sock.bind((0, 0))
            box.append(sock)
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=work, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if not box:
        raise LabError(f"{netns}: opening a netlink socket failed silently")
    if isinstance(box[0], BaseException):
        raise LabError(f"{netns}: cannot open a netlink socket: {box[0]}") from box[0]
    return box[0]


class NetnsReader:
    """Reads one interface's carrier and addresses in a namespace over rtnetlink.

    Why: a fork+exec of `ip` per namespace and sample takes tens of milliseconds on a
    loaded box; two netlink dumps on a socket opened once take well under one. Errors
    raise (OSError, LabError): a sampler must never read a failure as "no address".
    """

    def __init__(self, netns: str, timeout: float = 1.0) -> None:
        self.netns = netns
        self._sock = _netlink_socket_in(netns)
        self._sock.settimeout(timeout)
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the socket (it keeps the namespace alive while open)."""
        with self._lock:
            self._sock.close()

    def _dump(self, kind: int, payload: bytes) -> list[tuple[int, bytes]]:
        """Send one dump request and return its (type, body) replies."""
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            seq = self._seq
            header = _NLMSGHDR.pack(
                _NLMSGHDR.size + len(payload), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
            )
            self._sock.send(header + payload)
            out: list[tuple[int, bytes]] = []
            while True:
                data = self._sock.recv(1 << 16)
                off = 0
                while off + _NLMSGHDR.size <= len(data):
                    length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                    if length < _NLMSGHDR.size:
                        raise LabError(f"{self.netns}: malformed netlink reply")
                    body = data[off + _NLMSGHDR.size : off + length]
                    off += _align4(length)
                    if mseq != seq:
                        continue  # a late reply to an earlier, timed-out request
                    if mtype == NLMSG_DONE:
                        return out
                    if mtype == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", body)[0]
                        if err:
                            raise OSError(err, f"{self.netns}: netlink: {os.strerror(err)}")
                        return out
                    out.append((mtype, body))

    def interface(self, ifname: str) -> tuple[bool, list[str]]:
        """(has carrier, usable addresses as 'ip/len') of `ifname`; LabError if absent.

        IPv4 and IPv6; an IPv6 address still in (or refused by) the kernel's DAD answers
        nothing on the wire, so it is left out.
        """
        index = None
        carrier = False
        for mtype, body in self._dump(RTM_GETLINK, _IFINFOMSG.pack(0, 0, 0, 0, 0)):
            if mtype != RTM_NEWLINK or len(body) < _IFINFOMSG.size:
                continue
            attrs = _rtattrs(body[_IFINFOMSG.size :])
            if attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode() != ifname:
                continue
            index = _IFINFOMSG.unpack_from(body)[2]
            oper = attrs.get(IFLA_OPERSTATE, b"\0")[0]
            carrier = oper not in (IF_OPER_DOWN, IF_OPER_LOWERLAYERDOWN)
        if index is None:
            raise LabError(f"{self.netns}: no interface {ifname}")
        addrs: list[str] = []
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        for mtype, body in self._dump(RTM_GETADDR, request):
            if mtype != RTM_NEWADDR or len(body) < _IFADDRMSG.size:
                continue
            family, prefixlen, flags, _scope, idx = _IFADDRMSG.unpack_from(body)
            if family not in (socket.AF_INET, socket.AF_INET6) or idx != index:
                continue
            attrs = _rtattrs(body[_IFADDRMSG.size :])
            extended = attrs.get(IFA_FLAGS)
            if extended is not None and len(extended) == 4:
                flags = struct.unpack("=I", extended)[0]
            if family == socket.AF_INET6 and flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                continue
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            size = 4 if family == socket.AF_INET else 16
            if raw is not None and len(raw) == size:
                addrs.append(f"{socket.inet_ntop(family, raw)}/{prefixlen}")
        return carrier, addrs


# --------------------------------------------------------------------------
# the lab


class Lab:
    """A cluster of namespaced nodes; use as a context manager so down() always runs."""

    def __init__(
        self, nodes: int = 3, prefix: str | None = None, witness: bool = False, cluster: bool = True
    ) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError("nodes must be between 1 and 9")
        if prefix is None:
            prefix = fresh_prefix()
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r} must match {PREFIX_RE.pattern}")
        self.prefix = prefix
        self.workdir = workdir_for(prefix)
        self.cluster = cluster
        self.bridge_ns = f"{prefix}-br"
        self.client_ns = f"{prefix}-cl"
        self.client_mac = _mac_for(prefix, 100)
        self.ssh_dir = self.workdir / "ssh"
        self.ssh_key = self.ssh_dir / "id_ed25519"
        self.nodes: list[Node] = [self._make_node(i) for i in range(1, nodes + 1)]
        self.witness: Node | None = self._make_node(WITNESS_NODE_ID) if witness else None
        self.sudoers_file: Path | None = None
        self.timings: dict[str, float] = {}
        self._popens: list[subprocess.Popen[str]] = []
        self._owns_prefix = True
        self._is_up = False
        self._lock = threading.Lock()
        self._readers: dict[str, NetnsReader] = {}
        self._readers_lock = threading.Lock()

    # ---- naming ---------------------------------------------------------

    def _make_node(self, node_id: int) -> Node:
        """Describe node i (or the witness) before anything exists."""
        is_witness = node_id == WITNESS_NODE_ID
        name = "witness" if is_witness else f"node{node_id}"
        ip = WITNESS_IP if is_witness else f"192.0.2.{10 + node_id}"
        netns = f"{self.prefix}-w" if is_witness else f"{self.prefix}-n{node_id}"
        ndir = self.workdir / name
        return Node(
            name=name,
            node_id=node_id,
            netns=netns,
            ip=ip,
            mac=_mac_for(self.prefix, int(ip.rsplit(".", 1)[1])),
            dir=ndir,
            repmgr_conf=ndir / "repmgr.conf",
            socket_dir=ndir / "run",
            datadir=ndir / "data",
            is_witness=is_witness,
        )

    @property
    def all_nodes(self) -> list[Node]:
        """Data nodes followed by the witness, if any."""
        return self.nodes + ([self.witness] if self.witness else [])

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this run creates."""
        return [self.bridge_ns, self.client_ns] + [n.netns for n in self.all_nodes]

    @property
    def ssh_options(self) -> str:
        """ssh_options for repmgr.conf (repmgr adds -o BatchMode=yes itself)."""
        return " ".join(self.ssh_argv_options())

    def ssh_argv_options(self) -> list[str]:
        """The same ssh options as an argument list."""
        options = [
            "BatchMode=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "ConnectTimeout=2",
        ]
        return ["-q", *[arg for opt in options for arg in ("-o", opt)], "-i", str(self.ssh_key)]

    def node(self, name_or_id: str | int) -> Node:
        """Look a node up by name ('node2', 'witness'), namespace or node id."""
        for n in self.all_nodes:
            if str(name_or_id) in (n.name, n.netns, n.ip, str(n.node_id)):
                return n
        raise KeyError(f"no lab node {name_or_id!r}")

    # ---- lifecycle ------------------------------------------------------

    def __enter__(self) -> Self:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> Self:
        """Build namespaces, sshd and (unless cluster=False) the repmgr cluster.

        On failure everything is torn down again and the error carries log tails.
        """
        if self._is_up:
            return self
        missing = missing_prerequisites()
        if missing:
            raise LabError("lab prerequisites missing: " + "; ".join(missing))
        if _prefix_namespaces(self.prefix, list_netns()) or self.workdir.exists():
            self._owns_prefix = False  # never tear down somebody else's run
            raise LabError(
                f"lab prefix {self.prefix} is in use; clean it with "
                f"`python3 -m tests.lab down --prefix {self.prefix}`"
            )
        self._owns_prefix = True
        enable_reaper()
        t0 = time.monotonic()
        try:
            self._step("files", self._prepare_files)
            self._step("network", self._build_network)
            self._step("sshd", self._start_sshds)
            if self.cluster:
                self._step("cluster", self._build_cluster)
            self._step("ssh-check", self._verify_ssh)
            if self.cluster:
                self._step("streaming", self._wait_streaming)
        except BaseException as exc:
            diag = self._safe_diagnostics()
            keep = os.environ.get("RVLAB_KEEP_ON_FAILURE") == "1"
            if not keep:
                self.down()
            if isinstance(exc, Exception):
                msg = f"lab {self.prefix} failed to come up: {exc}\n{diag}"
                if keep:
                    msg += f"\n(kept: python3 -m tests.lab down --prefix {self.prefix})"
                raise LabError(msg) from exc
            raise
        self.timings["up"] = time.monotonic() - t0
        self._is_up = True
        self._log(f"up in {self.timings['up']:.2f}s: {self.timings}")
        return self

    def down(self) -> None:
        """Tear everything of this run down; safe to call any number of times."""
        if not self._owns_prefix:
            return
        t0 = time.monotonic()
        for proc in self._popens:
            if proc.poll() is None:
                _killpg(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._popens.clear()
        self._close_readers()
        cleanup(self.prefix)
        self.sudoers_file = None
        self._is_up = False
        self.timings["down"] = time.monotonic() - t0
        log.info("lab %s down in %.2fs", self.prefix, self.timings["down"])

    def _step(self, name: str, fn: Callable[[], None]) -> None:
        """Run one build step and remember how long it took."""
        t = time.monotonic()
        fn()
        self.timings[name] = round(time.monotonic() - t, 3)
        self._log(f"step {name} done in {self.timings[name]:.2f}s")

    def _log(self, msg: str) -> None:
        """Log to the logger and to workdir/lab.log (kept with the run's other logs)."""
        log.info("lab %s: %s", self.prefix, msg)
        with self._lock, contextlib.suppress(OSError), open(self.workdir / "lab.log", "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    # ---- build steps ----------------------------------------------------

    def _prepare_files(self) -> None:
        """Workdir, per-node dirs, ssh keys; unlock the postgres account."""
        ensure_postgres_account()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep dir
        _mkdir(self.workdir, mode=0o755, owner="root")
        _mkdir(self.ssh_dir, mode=0o700)
        env = _base_env("root", None)
        for key, comment in ((self.ssh_key, "lab"), (self.ssh_dir / "host_ed25519", "lab-host")):
            keygen = [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(key)]
            run_cmd([*keygen, "-C", f"{comment}-{self.prefix}"], env=env)
        uid, gid = _postgres_ids()
        for path in (self.ssh_key, Path(f"{self.ssh_key}.pub")):
            os.chown(path, uid, gid)
        os.chmod(self.ssh_key, 0o600)
        pub = Path(f"{self.ssh_key}.pub").read_text()
        _write(self.ssh_dir / "authorized_keys", pub, mode=0o600)
        for n in self.all_nodes:
            _mkdir(n.dir, mode=0o755)
            _mkdir(n.socket_dir, mode=0o755)

    def _build_network(self) -> None:
        """Namespaces, the isolated bridge and one veth per host; no routes out."""
        for ns in self.namespaces:
            _ip("netns", "add", ns)
        br = self.bridge_ns
        _ip("-n", br, "link", "set", "lo", "up")
        _ip(
            "-n", br, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"
        )
        _ip("-n", br, "link", "set", "br0", "up")
        hosts: list[tuple[str, str, str, str]] = [
            (n.netns, n.veth, n.ip, n.mac) for n in self.all_nodes
        ]
        hosts.append((self.client_ns, "vc", CLIENT_IP, self.client_mac))
        for ns, veth, ip, mac in hosts:
            peer = ["peer", "name", veth, "netns", br]
            _ip("link", "add", INTERFACE, "address", mac, "netns", ns, "type", "veth", *peer)
            _ip("-n", br, "link", "set", veth, "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", INTERFACE)
            _ip("-n", ns, "addr", "add", f"{ipv6_of(ip)}/64", "dev", INTERFACE, "nodad")
            run_cmd([IP_BIN, "netns", "exec", ns, SYSCTL, "-qw",
                     f"net.ipv6.conf.{INTERFACE}.ndisc_notify=1",
                     f"net.ipv6.conf.{INTERFACE}.router_solicitation_delay=0"], timeout=10)
            _ip("-n", ns, "link", "set", INTERFACE, "up")
        for n in self.all_nodes:
            info = json.loads(_ip("-n", n.netns, "-j", "link", "show", "dev", INTERFACE).stdout)
            if info[0]["address"] != n.mac:
                raise LabError(f"{n.name}: eth0 has MAC {info[0]['address']}, expected {n.mac}")

    def _sshd_argv(self, n: Node) -> list[str]:
        """sshd for one node, listening on the node's address only."""
        options = {
            "ListenAddress": n.ip,
            "Port": "22",
            "HostKey": str(self.ssh_dir / "host_ed25519"),
            "PidFile": str(n.socket_dir / "sshd.pid"),
            "AuthorizedKeysFile": str(self.ssh_dir / "authorized_keys"),
            "StrictModes": "no",  # the workdir is not root-owned all the way
            "UsePAM": "no",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PermitRootLogin": "no",
            "AllowUsers": PG_USER,
            "UseDNS": "no",
            "LogLevel": "VERBOSE",
        }
        argv = [SSHD, "-f", "/dev/null", "-E", str(n.dir / "sshd.log")]
        for key, value in options.items():
            argv += ["-o", f"{key}={value}"]
        return argv

    def _start_sshds(self) -> None:
        """One sshd per node inside its namespace (repmgr switchover needs ssh)."""
        for n in self.all_nodes:
            self.run(n, self._sshd_argv(n), user="root", timeout=10)
        for n in self.all_nodes:
            pid_file = n.socket_dir / "sshd.pid"
            self.wait_for(
                functools.partial(_has_pid, pid_file), 5, 0.02, f"sshd pid file on {n.name}"
            )

    def _verify_ssh(self) -> None:
        """postgres can ssh between every ordered pair of nodes (switchover needs it)."""
        pairs = [(a, b) for a in self.all_nodes for b in self.all_nodes if a != b]

        def check(pair: tuple[Node, Node]) -> None:
            a, b = pair
            res = self.ssh(a, b, "true", check=False, timeout=15)
            if res.returncode != 0:
                raise LabError(
                    f"ssh {a.name} -> {b.name} failed ({res.returncode}): {res.stderr.strip()}"
                )

        _parallel(check, pairs)
        if self.cluster and len(self.nodes) > 1:
            # repmgr runs its remote commands exactly like this: absolute
            # repmgr_bindir path, the remote node's own config file.
            a, b = self.nodes[0], self.nodes[1]
            res = self.ssh(
                a,
                b,
                f"{PG_BIN}/repmgr -f {b.repmgr_conf} node check --role",
                check=False,
                timeout=20,
            )
            if res.returncode != 0 or "OK" not in res.stdout:
                raise LabError(
                    f"repmgr node check over ssh {a.name} -> {b.name} failed: "
                    f"rc={res.returncode} out={res.stdout!r} err={res.stderr!r}"
                )

    def _postgresql_conf(self) -> str:
        """Settings shared by every node (cloned to the standbys)."""
        return f"""
# --- repmgr-vip lab ---
port = {PG_PORT}
wal_level = replica
hot_standby = on
max_wal_senders = 20  # 7 nodes: six clones at once, 2 senders each
max_replication_slots = 20
wal_log_hints = on
wal_keep_size = '128MB'
shared_preload_libraries = 'repmgr'
max_connections = 50
shared_buffers = '16MB'
dynamic_shared_memory_type = mmap
fsync = off
wal_retrieve_retry_interval = '1s'
wal_receiver_status_interval = '1s'
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
# Per-node settings (listen_addresses, socket dir) live outside the data
# directory, in DIR/postgresql.node.conf: pg_basebackup and pg_rewind copy
# everything inside it from the source node.
include_if_exists = '../postgresql.node.conf'
"""

    def _node_conf(self, n: Node) -> str:
        """Node-specific PostgreSQL settings (kept out of reach of clone and rewind)."""
        return (
            # '*' as on real servers, so that clients reach PostgreSQL through the VIP too
            "listen_addresses = '*'\n"
            f"unix_socket_directories = {_quote_conf(str(n.socket_dir))}\n"
            f"cluster_name = {_quote_conf(n.name)}\n"
        )

    @staticmethod
    def _pg_hba() -> str:
        """Trust everything inside the lab subnet and over the unix socket."""
        return (
            "local all all trust\n"
            "local replication all trust\n"
            f"host all all {SUBNET} trust\n"
            f"host replication all {SUBNET} trust\n"
            f"host all all {SUBNET6} trust\n"
            "host all all 127.0.0.1/32 trust\n"
        )

    def _repmgr_conf(self, n: Node) -> str:
        """repmgr.conf with fast failure detection and pg_ctl logging into the node dir."""
        conf = str(n.repmgr_conf)
        data = str(n.datadir)
        pg_ctl = f"{PG_BIN}/pg_ctl"
        priority = 0 if n.is_witness else (100 if n.node_id == 1 else 100 - n.node_id)
        settings: list[tuple[str, str]] = [
            ("node_id", str(n.node_id)),
            ("node_name", _quote_conf(n.name)),
            ("conninfo", _quote_conf(n.conninfo)),
            ("data_directory", _quote_conf(data)),
            ("pg_bindir", _quote_conf(PG_BIN)),
            ("repmgr_bindir", _quote_conf(PG_BIN)),
            ("log_file", _quote_conf(str(n.repmgr_log))),
            ("log_level", "'INFO'"),
            ("repmgrd_pid_file", _quote_conf(str(n.repmgrd_pid_file))),
            ("use_replication_slots", "yes"),
            ("location", "'lab'"),
            ("priority", str(priority)),
            ("failover", "'automatic'"),
            (
                "promote_command",
                _quote_conf(f"{PG_BIN}/repmgr standby promote -f {conf} --log-to-file"),
            ),
            (
                "follow_command",
                _quote_conf(
                    f"{PG_BIN}/repmgr standby follow -f {conf} --log-to-file --upstream-node-id=%n"
                ),
            ),
            ("monitor_interval_secs", "1"),
            ("reconnect_attempts", "3"),
            ("reconnect_interval", "1"),
            (
                "service_start_command",
                _quote_conf(f"{pg_ctl} -D {data} -w -t 60 -l {n.pg_log} start"),
            ),
            ("service_stop_command", _quote_conf(f"{pg_ctl} -D {data} -w -t 60 -m fast stop")),
            (
                "service_restart_command",
                _quote_conf(f"{pg_ctl} -D {data} -w -t 60 -m fast -l {n.pg_log} restart"),
            ),
            ("ssh_options", _quote_conf(self.ssh_options)),
        ]
        return "".join(f"{k}={v}\n" for k, v in settings)

    def _initdb(self, n: Node) -> None:
        """A fresh data directory with the lab's settings."""
        argv = [f"{PG_BIN}/initdb", "-D", str(n.datadir), "-U", PG_USER, "-A", "trust"]
        argv += ["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        self.run(n, argv, timeout=120)
        with open(n.datadir / "postgresql.conf", "a") as fh:
            fh.write(self._postgresql_conf())
        _write(n.datadir / "pg_hba.conf", self._pg_hba(), mode=0o600)

    def _create_repmgr_db(self, n: Node) -> None:
        """repmgr superuser and database, as repmgr's docs prescribe."""
        self.psql(n, f"CREATE ROLE {REPMGR_USER} SUPERUSER REPLICATION LOGIN", dbname="postgres")
        self.psql(n, f"CREATE DATABASE {REPMGR_DB} OWNER {REPMGR_USER}", dbname="postgres")
        self.psql(
            n,
            f'ALTER ROLE {REPMGR_USER} SET search_path TO repmgr, "$user", public',
            dbname="postgres",
        )

    def _build_cluster(self) -> None:
        """initdb + register node1, clone the standbys, optional witness."""
        for n in self.all_nodes:
            _write(n.repmgr_conf, self._repmgr_conf(n))
            _write(n.dir / "postgresql.node.conf", self._node_conf(n), mode=0o600)
        primary = self.nodes[0]

        def setup_primary() -> None:
            self._initdb(primary)
            self.start_postgres(primary)
            self._create_repmgr_db(primary)
            self.repmgr(primary, "primary", "register")

        def setup_witness_db() -> None:
            assert self.witness is not None
            self._initdb(self.witness)
            self.start_postgres(self.witness)
            self._create_repmgr_db(self.witness)

        steps: list[Callable[[], None]] = [setup_primary]
        if self.witness is not None:
            steps.append(setup_witness_db)
        _parallel(lambda f: f(), steps)

        def clone(n: Node) -> None:
            upstream = ["-h", primary.ip, "-U", REPMGR_USER, "-d", REPMGR_DB]
            self.repmgr(n, *upstream, "standby", "clone", "--fast-checkpoint", timeout=120)
            self.start_postgres(n)
            # register checks that the standby streams; right after start it may still be
            # in "catchup", so wait for the primary to see it streaming first
            self.wait_for(
                lambda: self.psql(
                    primary,
                    "SELECT count(*) FROM pg_stat_replication "
                    f"WHERE application_name = '{n.name}' AND state = 'streaming'",
                    dbname="postgres",
                ) == "1",
                60,
                what=f"{n.name} streaming before register",
            )
            self.repmgr(n, "standby", "register")

        def witness_register() -> None:
            assert self.witness is not None
            self.repmgr(self.witness, "witness", "register", "-h", primary.ip)

        tasks: list[Callable[[], None]] = [functools.partial(clone, n) for n in self.nodes[1:]]
        if self.witness is not None:
            tasks.append(witness_register)
        _parallel(lambda f: f(), tasks)

    def _wait_streaming(self) -> None:
        """Every standby streams from node1 before up() returns."""
        primary = self.nodes[0]
        want = len(self.nodes) - 1
        self.wait_for(
            lambda: self.streaming_count(primary) >= want,
            30,
            0.05,
            f"{want} streaming standbys on {primary.name}",
        )

    # ---- running things in nodes ---------------------------------------

    def _exec_argv(self, node: Node | None, argv: Sequence[str], user: str) -> list[str]:
        """ip netns exec NS [runuser -u USER --] argv."""
        ns = self.client_ns if node is None else node.netns
        cmd = [IP_BIN, "netns", "exec", ns]
        if user != "root":
            cmd += [RUNUSER, "-u", user, "--"]
        return cmd + list(argv)

    def run(
        self,
        node: Node | None,
        argv: Sequence[str],
        *,
        user: str = PG_USER,
        check: bool = True,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in a node's namespace (None: the client's) as `user` ("root": no runuser)."""
        return run_cmd(
            self._exec_argv(node, argv, user),
            check=check,
            timeout=timeout,
            env=_base_env(user, env),
            input=input,
        )

    def popen(
        self,
        node: Node | None,
        argv: Sequence[str],
        *,
        user: str = PG_USER,
        env: Mapping[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        """Start argv in the background in a node's namespace; killed by down()."""
        proc = subprocess.Popen(
            self._exec_argv(node, argv, user),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=_base_env(user, env),
            text=True,
            start_new_session=True,
        )
        self._popens.append(proc)
        return proc

    def ssh(
        self, src: Node, dst: Node, command: str, *, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """ssh as postgres from src to dst with repmgr's ssh_options."""
        return self.run(
            src,
            [SSH, *self.ssh_argv_options(), f"{PG_USER}@{dst.ip}", command],
            check=check,
            timeout=timeout,
        )

    def repmgr(
        self, node: Node, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """PG_BIN/repmgr -f node.repmgr_conf ARGS as postgres in the node's namespace."""
        return self.run(
            node,
            [f"{PG_BIN}/repmgr", "-f", str(node.repmgr_conf), *args],
            check=check,
            timeout=timeout,
        )

    def psql(self, node: Node, sql: str, *, dbname: str = REPMGR_DB, timeout: float = 10) -> str:
        """Run SQL over the node's unix socket as postgres; stripped -At output."""
        argv = [f"{PG_BIN}/psql", "-h", str(node.socket_dir), "-p", str(PG_PORT)]
        argv += ["-U", PG_USER, "-d", dbname, "-AtX", "-v", "ON_ERROR_STOP=1", "-c", sql]
        connect_timeout = str(max(1, min(5, int(timeout))))
        res = self.run(node, argv, timeout=timeout, env={"PGCONNECT_TIMEOUT": connect_timeout})
        return res.stdout.strip()

    def is_in_recovery(self, node: Node) -> bool | None:
        """pg_is_in_recovery(), or None if the node does not answer within 3 s."""
        try:
            out = self.psql(node, "SELECT pg_is_in_recovery()", dbname="postgres", timeout=3)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return None
        return {"t": True, "f": False}.get(out)

    def primary(self) -> Node | None:
        """The data node not in recovery; None if none; LabError if several."""
        primaries = [n for n in self.nodes if self.is_in_recovery(n) is False]
        if len(primaries) > 1:
            raise LabError("more than one primary: " + ", ".join(n.name for n in primaries))
        return primaries[0] if primaries else None

    def streaming_count(self, node: Node) -> int:
        """Number of walsenders in state 'streaming' on node (0 if unreachable)."""
        try:
            out = self.psql(
                node,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                dbname="postgres",
                timeout=3,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return 0
        return int(out or 0)

    def timeline(self, node: Node) -> int | None:
        """The node's current timeline (None if unreachable): higher wins.

        Not pg_control_checkpoint() alone: after a promotion it shows the old
        timeline until the next checkpoint (seconds); the WAL file name does not.
        """
        sql = (
            "SELECT CASE WHEN pg_is_in_recovery() THEN COALESCE("
            "(SELECT received_tli FROM pg_stat_wal_receiver),"
            " (SELECT timeline_id FROM pg_control_checkpoint()))"
            " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))"
            "::bit(32)::int END"
        )
        try:
            out = self.psql(node, sql, dbname="postgres", timeout=3)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return None
        return int(out) if out.isdigit() else None

    def cluster_show(self, node: Node | None = None) -> list[tuple[int, int, int]]:
        """`repmgr cluster show --csv` rows: (node_id, connection_status, recovery_type)."""
        res = self.repmgr(node or self.nodes[0], "cluster", "show", "--csv", check=False)
        rows: list[tuple[int, int, int]] = []
        for line in res.stdout.splitlines():
            parts = line.strip().split(",")
            if len(parts) == 3 and all(p.lstrip("-").isdigit() for p in parts):
                rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
        return rows

    # ---- repmgr.conf ----------------------------------------------------

    def append_repmgr_conf(self, node: Node, text: str) -> None:
        """Append lines to repmgr.conf; repmgr takes the last value of a repeated key.

        repmgrd reads the file when it starts, so restart it to apply changes.
        """
        with open(node.repmgr_conf, "a") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")

    def set_repmgr_conf(self, node: Node, key: str, value: str, *, quote: bool = True) -> None:
        """Replace (or add) one key in repmgr.conf."""
        line = f"{key}={_quote_conf(value) if quote else value}"
        lines = node.repmgr_conf.read_text().splitlines()
        pat = re.compile(rf"^\s*{re.escape(key)}\s*=")
        kept = [ln for ln in lines if not pat.match(ln)]
        _write(node.repmgr_conf, "\n".join([*kept, line]) + "\n")

    # ---- network observation -------------------------------------------

    def _link_json(self, ns: str, *args: str) -> list[dict[str, Any]]:
        """`ip -n NS -j addr show dev eth0` and friends, parsed."""
        res = _ip("-n", ns, "-j", *args, check=False, timeout=5)
        if res.returncode != 0 or not res.stdout.strip():
            return []
        data = json.loads(res.stdout)
        return data if isinstance(data, list) else []

    def addresses(self, node: Node) -> list[str]:
        """IPv4 addresses on the node's eth0 as 'a.b.c.d/len'."""
        out: list[str] = []
        for link in self._link_json(node.netns, "-4", "addr", "show", "dev", INTERFACE):
            for info in link.get("addr_info", []):
                if info.get("family") == "inet":
                    out.append(f"{info['local']}/{info['prefixlen']}")
        return out

    def has_carrier(self, node: Node) -> bool:
        """eth0 is up and plugged in (operstate not DOWN/LOWERLAYERDOWN)."""
        links = self._link_json(node.netns, "link", "show", "dev", INTERFACE)
        return bool(links) and links[0].get("operstate") not in ("DOWN", "LOWERLAYERDOWN")

    def _reader(self, node: Node) -> NetnsReader:
        """The node's netlink reader, opened on first use and closed by down()."""
        with self._readers_lock:
            reader = self._readers.get(node.netns)
            if reader is None:
                reader = self._readers[node.netns] = NetnsReader(node.netns)
            return reader

    def _close_readers(self) -> None:
        """Close every netlink socket: an open one would keep its namespace alive."""
        with self._readers_lock:
            readers = list(self._readers.values())
            self._readers.clear()
        for reader in readers:
            with contextlib.suppress(OSError):
                reader.close()

    def vip_holders(self, ip: str = VIP_IP) -> list[str]:
        """Nodes with `ip` on an eth0 that has carrier: the ones that could collide.

        Read over netlink (cheap enough for a 50 ms sampler); raises when a node
        cannot be read, never answers "nobody" for "could not look".
        """
        holders: list[str] = []
        for n in self.all_nodes:
            carrier, addrs = self._reader(n).interface(INTERFACE)
            if carrier and any(_same_ip(a.split("/", 1)[0], ip) for a in addrs):
                holders.append(n.name)
        return holders

    def client_arping(self, ip: str = VIP_IP, count: int = 1, timeout: float = 1.0) -> list[str]:
        """MACs (lower case, distinct, in reply order) that answer ARP for ip at the client.

        iputils arping stops once `count` replies arrived: use count >= 2 to see
        a second responder (a duplicate VIP); vip_holders() is the exact check.
        """
        res = self.run(
            None,
            [ARPING, "-I", INTERFACE, "-c", str(count), "-w", f"{timeout:g}", ip],
            user="root",
            check=False,
            timeout=timeout + 5,
        )
        macs: list[str] = []
        for m in re.finditer(r"reply from \S+ \[([0-9A-Fa-f:]{17})\]", res.stdout):
            mac = m.group(1).lower()
            if mac not in macs:
                macs.append(mac)
        return macs

    def client_neigh_mac(self, ip: str = VIP_IP) -> str | None:
        """The MAC the client's neighbour table holds for ip (None if none/failed)."""
        for entry in self._link_json(self.client_ns, "neigh", "show", "to", ip):
            mac = entry.get("lladdr")
            if entry.get("dst") == ip and isinstance(mac, str):
                return mac.lower()
        return None

    def client_psql(
        self,
        sql: str,
        *,
        host: str = VIP_IP,
        dbname: str = REPMGR_DB,
        user: str = REPMGR_USER,
        timeout: float = 10,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """psql over TCP from the client namespace, as an application would reach the VIP.

        Also fills the client's neighbour table (arping does not).
        """
        connect = max(1, min(5, int(timeout)))
        conninfo = (
            f"host={host} port={PG_PORT} dbname={dbname} user={user} connect_timeout={connect}"
        )
        return self.run(
            None,
            [f"{PG_BIN}/psql", conninfo, "-AtX", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=check,
            timeout=timeout,
        )

    def node_by_mac(self, mac: str) -> Node | None:
        """Which node owns a MAC (for readable assertions)."""
        return next((n for n in self.all_nodes if n.mac == mac.lower()), None)

    # ---- fault injection -----------------------------------------------

    def postmaster_pid(self, node: Node) -> int | None:
        """The live postmaster's pid from postmaster.pid, None if not running."""
        pid = _read_pid(node.datadir / "postmaster.pid")
        return pid if pid is not None and _proc_alive(pid) else None

    def kill_postgres(self, node: Node, *, children: bool = True) -> None:
        """kill -9 the postmaster (and by default its children at the same instant).

        Killing the children too makes the crash deterministic: orphaned backends
        would otherwise keep shared memory attached for a moment and block a restart.
        """
        pid = self.postmaster_pid(node)
        if pid is None:
            raise LabError(f"{node.name}: PostgreSQL is not running")
        victims = [pid]
        if children:
            victims += self._children(pid)
        _signal(victims, signal.SIGKILL)
        left = _settle_dead(victims, 3)
        if any(_proc_alive(p) for p in left):
            raise LabError(f"{node.name}: processes {left} survived SIGKILL")
        if pid in left:
            # A zombie we cannot reap (lab built by another process): a real
            # crash leaves a pid file naming a dead pid; this one looks alive.
            self._log(f"{node.name}: unreaped zombie postmaster {pid}; removing pid file")
            with contextlib.suppress(FileNotFoundError):
                (node.datadir / "postmaster.pid").unlink()

    @staticmethod
    def _children(pid: int) -> list[int]:
        """Direct children of pid (from /proc)."""
        kids: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[-1].split()[1]) == pid:
                kids.append(int(entry.name))
        return kids

    def stop_postgres(self, node: Node, *, check: bool = True) -> None:
        """pg_ctl stop -m fast."""
        self.run(
            node,
            [f"{PG_BIN}/pg_ctl", "-D", str(node.datadir), "-w", "-t", "60", "-m", "fast", "stop"],
            check=check,
            timeout=70,
        )

    def start_postgres(self, node: Node, *, check: bool = True) -> None:
        """pg_ctl start -w, logging into the node dir."""
        pg_ctl = [f"{PG_BIN}/pg_ctl", "-D", str(node.datadir), "-w", "-t", "60"]
        self.run(node, [*pg_ctl, "-l", str(node.pg_log), "start"], check=check, timeout=70)

    def link_down(self, node: Node) -> None:
        """Unplug the node: its bridge-side veth goes down, its eth0 loses carrier."""
        _ip("-n", self.bridge_ns, "link", "set", node.veth, "down")

    def link_up(self, node: Node) -> None:
        """Plug the node back in."""
        _ip("-n", self.bridge_ns, "link", "set", node.veth, "up")

    def freeze(self, node: Node) -> list[int]:
        """SIGSTOP every process in the node's namespace (a hung host; ARP still answered)."""
        stopped: set[int] = set()
        for _ in range(10):
            # Our own `ip -n NS` helpers (e.g. a VipSampler's) are in the
            # namespace for a moment: stopping them would stall the test itself.
            ours = {p for p in _our_children() if _proc_comm(p) == "ip"}
            fresh = set(netns_pids(node.netns)) - stopped - ours
            if not fresh:
                break
            _signal(fresh, signal.SIGSTOP)
            stopped |= fresh
        return sorted(stopped)

    def freeze_postgres(self, node: Node) -> list[int]:
        """SIGSTOP the node's postmaster and every process below it (a hung PostgreSQL on a
        host that is otherwise fine: sshd, repmgrd and the kernel still answer)."""
        pid = self.postmaster_pid(node)
        if pid is None:
            raise LabError(f"{node.name}: PostgreSQL is not running")
        _signal([pid], signal.SIGSTOP)  # first: a stopped postmaster forks no new children
        stopped = [pid]
        frontier = [pid]
        while frontier:
            kids = [k for p in frontier for k in self._children(p) if k not in stopped]
            _signal(kids, signal.SIGSTOP)
            stopped += kids
            frontier = kids
        return stopped  # in the order stopped: the postmaster first

    def thaw_postgres(self, pids: Iterable[int]) -> None:
        """SIGCONT what freeze_postgres() stopped (postmaster last, so it finds its children
        running)."""
        _signal(reversed(list(pids)), signal.SIGCONT)

    def thaw(self, node: Node) -> None:
        """SIGCONT every process in the node's namespace."""
        _signal(netns_pids(node.netns), signal.SIGCONT)

    # ---- repmgrd --------------------------------------------------------

    def repmgrd_pid(self, node: Node) -> int | None:
        """The running repmgrd's pid (pid file first, then a scan of the namespace)."""
        pid = _read_pid(node.repmgrd_pid_file)
        if pid is not None and _proc_alive(pid) and _proc_comm(pid) == "repmgrd":
            return pid
        for p in netns_pids(node.netns):
            if _proc_comm(p) == "repmgrd" and _proc_alive(p):
                return p
        return None

    def start_repmgrd(self, node: Node, *, timeout: float = 10) -> int:
        """Start plain `repmgrd -f CONF` (it daemonizes) and return its pid."""
        out = node.dir / "repmgrd.stdout"
        with open(out, "ab") as fh:
            res = subprocess.run(
                self._exec_argv(node, [f"{PG_BIN}/repmgrd", "-f", str(node.repmgr_conf)], PG_USER),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=fh,
                env=_base_env(PG_USER, None),
                timeout=timeout,
                check=False,
            )
        if res.returncode != 0:
            raise LabError(f"{node.name}: repmgrd exited {res.returncode}; see {out}")
        found: list[int] = []

        def started() -> bool:
            pid = _read_pid(node.repmgrd_pid_file)
            if pid is not None and _proc_alive(pid):
                found.append(pid)
                return True
            return False

        self.wait_for(started, timeout, 0.05, f"repmgrd pid file on {node.name}")
        return found[-1]

    def stop_repmgrd(self, node: Node, *, timeout: float = 10) -> None:
        """SIGTERM repmgrd and wait for it; SIGKILL if it will not go."""
        pid = self.repmgrd_pid(node)
        if pid is None:
            return
        _signal([pid], signal.SIGCONT)
        _signal([pid], signal.SIGTERM)
        if _wait_dead([pid], timeout):
            _signal([pid], signal.SIGKILL)
        self._forget_repmgrd(node, pid)

    def kill_repmgrd(self, node: Node) -> None:
        """kill -9 repmgrd (it leaves its pid file behind, as after a real crash)."""
        pid = self.repmgrd_pid(node)
        if pid is None:
            raise LabError(f"{node.name}: repmgrd is not running")
        _signal([pid], signal.SIGKILL)
        self._forget_repmgrd(node, pid)

    def _forget_repmgrd(self, node: Node, pid: int) -> None:
        """Wait for a dead repmgrd; drop its pid file if an unreaped zombie keeps it 'alive'."""
        left = _settle_dead([pid], 3)
        if any(_proc_alive(p) for p in left):
            raise LabError(f"{node.name}: repmgrd {pid} survived SIGKILL")
        if left and _read_pid(node.repmgrd_pid_file) == pid:
            node.repmgrd_pid_file.unlink(missing_ok=True)

    # ---- misc -----------------------------------------------------------

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = ""
    ) -> None:
        """Poll predicate until true; TimeoutError naming `what` (and the last error)."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while True:
            try:
                if predicate():
                    return
                last_exc = None
            except Exception as exc:
                last_exc = exc
            if time.monotonic() >= deadline:
                msg = f"timed out after {timeout:g}s waiting for {what or predicate!r}"
                if last_exc is not None:
                    msg += f" (last error: {last_exc!r})"
                raise TimeoutError(msg)
            time.sleep(interval)

    def install_sudoers(self, text: str) -> Path:
        """Validate with visudo -cf and install /etc/sudoers.d/repmgr-vip-lab-PREFIX (0440)."""
        if not text.endswith("\n"):
            text += "\n"
        # Cmnd_Alias names are global to sudo: two labs installing the same VIP's rules at
        # once would define one alias twice, and sudo then refuses every rule on the machine
        for alias in set(re.findall(r"^Cmnd_Alias\s+(\w+)", text, re.MULTILINE)):
            text = re.sub(rf"\b{alias}\b", f"{alias}_{self.prefix.upper()}", text)
        final = sudoers_file_for(self.prefix)
        # sudo ignores files with a '.' in their name: the temp file is inert.
        tmp = SUDOERS_DIR / f".{final.name}.tmp"
        tmp.write_text(text)
        try:
            os.chmod(tmp, 0o440)
            run_cmd([VISUDO, "-cf", str(tmp)], env=_base_env("root", None))
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.sudoers_file = final
        return final

    def diagnostics(self, lines: int = 30) -> str:
        """Log tails and node states, for a failing test's report."""
        parts = [f"lab {self.prefix} workdir {self.workdir}"]
        for n in self.all_nodes:
            state = "?"
            if n.datadir.exists():
                rec = self.is_in_recovery(n)
                state = {True: "standby", False: "primary", None: "down"}[rec]
            parts.append(
                f"== {n.name} ({n.netns} {n.ip}) pg={state} addrs={self.addresses(n)} "
                f"carrier={self.has_carrier(n)} repmgrd={self.repmgrd_pid(n)}"
            )
            extra = (n.dir / "repmgr-vip.log", n.dir / "repmgr-vip-daemon.json")
            for f in (n.repmgr_log, n.pg_log, n.dir / "sshd.log", n.dir / "repmgrd.stdout", *extra):
                if f.exists():
                    tail = f.read_text(errors="replace").splitlines()[-lines:]
                    if tail:
                        parts.append(f"-- {f.name} --")
                        parts.extend(tail)
        return "\n".join(parts)

    def _safe_diagnostics(self) -> str:
        """diagnostics() that never raises (used while handling another error)."""
        try:
            return self.diagnostics(lines=15)
        except Exception as exc:
            return f"(no diagnostics: {exc!r})"

    def node_table(self) -> str:
        """Human-readable node list for the CLI."""
        rows = [f"{'name':8} {'id':>3} {'netns':10} {'ip':12} {'mac':17} dir"]
        for n in self.all_nodes:
            rows.append(f"{n.name:8} {n.node_id:>3} {n.netns:10} {n.ip:12} {n.mac:17} {n.dir}")
        rows.append(
            f"{'client':8} {'':>3} {self.client_ns:10} {CLIENT_IP:12} {self.client_mac:17} -"
        )
        return "\n".join(rows)


# --------------------------------------------------------------------------
# VIP sampling


class VipSampler:
    """Samples lab.vip_holders() every ~50 ms in a thread: catches even brief double VIPs.

    Use as a context manager around a scenario, then call assert_never_two(). A sampler
    that could not look proves nothing: any sampling error, no samples at all, or a gap
    over `max_gap` between two samples fails assert_sound() (and so assert_never_two()).
    """

    def __init__(
        self, lab: Any, interval: float = 0.05, ip: str = VIP_IP, max_gap: float = 0.2
    ) -> None:
        self.lab = lab
        self.interval = interval
        self.ip = ip
        self.max_gap = max_gap
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start sampling in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="vip-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (takes one last sample first)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        self.sample()

    def sample(self) -> tuple[str, ...]:
        """Take one sample now."""
        t = time.monotonic()
        try:
            holders = tuple(self.lab.vip_holders(self.ip))
        except Exception as exc:
            with self._lock:
                self.errors.append((t, repr(exc)))
            return ()
        with self._lock:
            self.samples.append((t, holders))
        return holders

    def _loop(self) -> None:
        """Sample until stopped."""
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    @property
    def max_holders(self) -> int:
        """Largest number of simultaneous holders seen."""
        with self._lock:
            return max((len(h) for _, h in self.samples), default=0)

    @property
    def last(self) -> tuple[str, ...]:
        """Holders in the latest sample."""
        with self._lock:
            return self.samples[-1][1] if self.samples else ()

    def transitions(self) -> list[tuple[float, tuple[str, ...]]]:
        """Samples where the holder set changed (time relative to the first sample)."""
        with self._lock:
            samples = list(self.samples)
        out: list[tuple[float, tuple[str, ...]]] = []
        prev: tuple[str, ...] | None = None
        t0 = samples[0][0] if samples else 0.0
        for t, holders in samples:
            if holders != prev:
                out.append((round(t - t0, 3), holders))
                prev = holders
        return out

    def first_time(self, predicate: Callable[[tuple[str, ...]], bool]) -> float | None:
        """Monotonic time of the first sample satisfying predicate."""
        with self._lock:
            return next((t for t, h in self.samples if predicate(h)), None)

    def periods(self) -> list[float]:
        """Seconds between consecutive samples."""
        with self._lock:
            times = [t for t, _ in self.samples]
        return [b - a for a, b in itertools.pairwise(times)]

    def period_stats(self) -> dict[str, float]:
        """count, median, p99 and max of the sample period in ms (for reports)."""
        periods = sorted(self.periods())
        if not periods:
            return {"count": 0}

        def pick(q: float) -> float:
            return round(1000 * periods[min(len(periods) - 1, int(q * len(periods)))], 1)

        return {"count": len(periods) + 1, "median_ms": pick(0.5), "p99_ms": pick(0.99),
                "max_ms": round(1000 * periods[-1], 1)}

    def assert_sound(self) -> None:
        """AssertionError unless the samples prove something: no errors, some samples,
        no gap over max_gap between two of them."""
        with self._lock:
            errors = list(self.errors)
            samples = list(self.samples)
        if errors:
            t0 = samples[0][0] if samples else errors[0][0]
            shown = "; ".join(f"+{t - t0:.2f}s {e}" for t, e in errors[:5])
            raise AssertionError(f"VIP sampler failed {len(errors)} times: {shown}")
        if not samples:
            raise AssertionError("VIP sampler took no samples: it proves nothing")
        t0 = samples[0][0]
        gaps = [
            (a - t0, b - a)
            for (a, _), (b, _) in itertools.pairwise(samples)
            if b - a > self.max_gap
        ]
        if gaps:
            shown = ", ".join(f"+{t:.2f}s: {g * 1000:.0f} ms" for t, g in gaps[:10])
            raise AssertionError(
                f"VIP sampler left {len(gaps)} gaps over {self.max_gap * 1000:.0f} ms "
                f"between samples (a double VIP could hide there): {shown}"
            )

    def assert_never_two(self) -> None:
        """AssertionError listing the samples where two or more nodes held the VIP,
        or when the sampling itself is unsound (see assert_sound)."""
        with self._lock:
            bad = [(t, h) for t, h in self.samples if len(h) > 1]
            t0 = self.samples[0][0] if self.samples else 0.0
            count = len(self.samples)
        if bad:
            shown = ", ".join(f"+{t - t0:.2f}s {list(h)}" for t, h in bad[:20])
            raise AssertionError(
                f"VIP {self.ip} held by more than one node in {len(bad)} of {count} "
                f"samples: {shown}; transitions: {self.transitions()}"
            )
        self.assert_sound()
