"""The three ways a failover moves the VIP in one lab, as functions that take a Lab.

* `ideal`: plain `promote_command` (repmgr standby promote only, the lab's own lines) and
  bench/mover.py, root in the client namespace, moving the VIP the instant it sees the
  promotion. The baseline.
* `hooks`: repmgr-vip's hook lines, no daemon (repmgrd runs `repmgr-vip promote`).
* `daemon`: the same hooks with `repmgr-vip daemon` on every node, as the systemd unit runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lab import INTERFACE, VIP, Lab, Node
from tests.integration.vipconf import start_daemon, stop_daemon, wire_hooks

MOVER = Path(__file__).parent / "mover.py"
MODES = ("ideal", "hooks", "daemon")
DAEMON_WARMUP = 4.0  # imports, first cycles, peer watchers, SSH masters
LINKS_TIMEOUT = 120.0  # 7 nodes: 42 SSH masters and their forwards on 2 cores


def original_confs(lab: Lab) -> dict[str, str]:
    """Each node's repmgr.conf as the lab wrote it (plain promote/follow commands)."""
    return {n.name: n.repmgr_conf.read_text() for n in lab.nodes}


def restart_repmgrd(lab: Lab) -> None:
    """repmgrd reads promote_command at start: stop every one, then start every one."""
    for node in lab.nodes:
        lab.stop_repmgrd(node)
    for node in lab.nodes:
        lab.start_repmgrd(node)


def wait_warm_links(lab: Lab, timeout: float = LINKS_TIMEOUT) -> float | None:
    """Seconds until every daemon greets through a warm link to each of its peers (as
    daemons that have been running for a while do); None if not within `timeout`."""
    from repmgr_vip.adapters.sshmux import link_answers

    started = time.monotonic()
    want = len(lab.nodes) - 1
    while time.monotonic() - started < timeout:
        links = [[p for p in node.dir.glob("repmgr-vip-ssh-*/link-*")] for node in lab.nodes]
        if all(len(found) >= want and all(link_answers(p) == "" for p in found)
               for found in links):
            return time.monotonic() - started
        time.sleep(0.5)
    return None


class Modes:
    """Switches one lab between the modes; keeps the mover and the daemons it started."""

    def __init__(self, lab: Lab, originals: dict[str, str]) -> None:
        self.lab = lab
        self.originals = originals
        self.mode = "hooks"  # hooked_cluster() left it so
        self.mover: subprocess.Popen[str] | None = None
        self.mover_events: list[dict[str, Any]] = []
        self.daemons: list[subprocess.Popen[str]] = []
        self.links_warm_s: float | None = None  # daemon mode: until every link greeted

    def switch(self, mode: str, holder: Node) -> None:
        if mode == self.mode:
            return
        self._stop_mover()
        self._stop_daemons()
        for node in self.lab.nodes:
            if mode == "ideal":
                node.repmgr_conf.write_text(self.originals[node.name])
            else:
                wire_hooks(self.lab, node)
        restart_repmgrd(self.lab)
        if mode == "ideal":
            self._start_mover(holder)
        elif mode == "daemon":
            self.daemons = [start_daemon(self.lab, node) for node in self.lab.nodes]
            time.sleep(DAEMON_WARMUP)
            self.links_warm_s = wait_warm_links(self.lab)
        self.mode = mode

    def _start_mover(self, holder: Node) -> None:
        argv = [sys.executable, str(MOVER), "--holder", holder.name, "--vip", VIP,
                "--interface", INTERFACE]
        for node in self.lab.nodes:
            argv += ["--node", f"{node.name}={node.netns}={node.conninfo}"]
        self.mover = self.lab.popen(None, argv, user="root", stderr=subprocess.DEVNULL)
        self.mover_events = []
        threading.Thread(target=self._read_mover, args=(self.mover,), daemon=True).start()
        deadline = time.monotonic() + 10
        while not self.mover_events and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # every node's connection made

    def _read_mover(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                self.mover_events.append(json.loads(line))
            except json.JSONDecodeError:
                continue

    def moved_at(self, node: str, after: float) -> float | None:
        return next((float(e["t"]) for e in self.mover_events
                     if e.get("event") == "moved" and e.get("node") == node
                     and float(e["t"]) >= after), None)

    def _stop_mover(self) -> None:
        if self.mover is not None:
            self.mover.terminate()
            self.mover.wait(timeout=10)
            self.mover = None

    def _stop_daemons(self) -> None:
        for proc in self.daemons:
            try:
                stop_daemon(proc)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.daemons = []

    def close(self) -> None:
        self._stop_mover()
        self._stop_daemons()
