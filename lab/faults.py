"""Faults a test injects into a lab node: process kills, stops, link cuts and freezes."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

from lab.procs import (
    _base_env,
    _ip,
    _our_children,
    _proc_alive,
    _proc_comm,
    _read_pid,
    _settle_dead,
    _signal,
    _wait_dead,
    netns_pids,
)
from lab.settings import PG_BIN, PG_USER, LabError, Node


class FaultsMixin:
    """What a test does to a node: kill, stop, cut, freeze (methods of Lab)."""

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
