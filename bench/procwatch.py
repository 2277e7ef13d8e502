"""When each repmgr-vip process of one lab started and was last seen, from /proc.

repmgr(d) starts the hooks, so nothing of ours logs the instant a hook process begins; the
kernel records it (/proc/PID/stat field 22, in clock ticks since boot, 10 ms here). A thread
scans /proc for new processes whose command line names repmgr-vip and this lab's work
directory (other labs may run beside us) and keeps their start time as wall-clock time.
`count_forks` counts the processes a running daemon starts (the quiet daemon's figure).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
# repmgr-vip's processes, and a plain `repmgr standby promote` (the ideal mover's
# promote_command, as repmgrd's `sh -c` or repmgr itself)
PROGRAMS = (b"repmgr-vip", b"standby promote", b"standby\0promote")
RECHECK = 0.3  # a fresh pid may still be the forking parent's image; read it again for a while


@dataclass
class Proc:
    pid: int
    start: float  # wall clock, from the kernel's start time
    first_seen: float
    last_seen: float
    cmdline: str
    ended: bool = False


def _boot_wall() -> float:
    """Wall-clock time of boot on the clock /proc start times count from."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[-1].split()[19])


class ProcWatch:
    """Background /proc scanner for one lab's repmgr-vip processes."""

    def __init__(self, marker: str, interval: float = 0.02) -> None:
        self.marker = marker.encode()
        self.interval = interval
        self.procs: dict[tuple[int, int], Proc] = {}  # (pid, start ticks)
        self._young: dict[int, float] = {}
        self._old: set[int] = set(self._pids())  # already running: not ours to time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="procwatch", daemon=True)
        self._lock = threading.Lock()

    @staticmethod
    def _pids() -> list[int]:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]

    def __enter__(self) -> ProcWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _scan(self) -> None:
        now = time.time()
        live = set(self._pids())
        boot = _boot_wall()
        with self._lock:
            running = [(key, proc) for key, proc in self.procs.items() if not proc.ended]
        for (pid, started), proc in running:
            if pid in live and _start_ticks(pid) == started:
                proc.last_seen = now
            else:
                proc.ended = True
        self._old &= live  # a pid that comes back is a new process
        self._young = {pid: seen for pid, seen in self._young.items() if pid in live}
        for pid in live - self._old:
            seen = self._young.setdefault(pid, now)
            if now - seen > RECHECK:
                self._old.add(pid)
                del self._young[pid]
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if not any(name in cmdline for name in PROGRAMS) or self.marker not in cmdline:
                continue
            ticks = _start_ticks(pid)
            if ticks is None or (pid, ticks) in self.procs:
                continue
            text = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            with self._lock:
                self.procs[(pid, ticks)] = Proc(pid, boot + ticks / CLK_TCK, now, now, text)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self._scan()
            self._stop.wait(self.interval)

    def find(self, contains: str, word: str, after: float = 0.0) -> list[Proc]:
        """Processes started at or after `after` whose command line contains `contains` and
        has `word` as a whole word (so `promote` does not match `--event=standby_promote`)."""
        with self._lock:
            found = [p for p in self.procs.values() if p.start >= after
                     and contains in p.cmdline and word in p.cmdline.split()]
        return sorted(found, key=lambda p: p.start)


STRACE = shutil.which("strace")


def count_forks(pid: int, seconds: float) -> dict[str, Any]:
    """New processes the daemon `pid` (any of its threads) starts in `seconds`, and what they
    run: strace on the fork family only (seccomp-bpf, so the daemon's other system calls are
    not stopped), following children so that their exec is seen. Without strace on the
    machine: {"error": ...}.
    """
    if STRACE is None:
        return {"error": "strace not installed"}
    with tempfile.NamedTemporaryFile("r", prefix="rv-forks-", suffix=".txt") as out:
        proc = subprocess.Popen(
            [STRACE, "-f", "-qq", "--seccomp-bpf", "-e", "trace=clone,clone3,fork,vfork,execve",
             "-o", out.name, "-p", str(pid)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        time.sleep(seconds)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        text = out.read()
    forks = threads = 0
    programs: dict[str, int] = {}
    for line in text.splitlines():
        if re.search(r"\b(clone3?|v?fork)\(", line) and re.search(r"= \d+$", line):
            if "CLONE_THREAD" in line:
                threads += 1
            else:
                forks += 1
        found = re.search(r'execve\("([^"]+)"', line)
        if found and line.rstrip().endswith("= 0"):
            name = os.path.basename(found.group(1))
            programs[name] = programs.get(name, 0) + 1
    return {"seconds": seconds, "forks": forks, "threads": threads, "programs": programs,
            "forks_per_min": forks * 60.0 / seconds, "threads_per_min": threads * 60.0 / seconds}
