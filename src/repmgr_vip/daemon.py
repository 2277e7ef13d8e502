"""`repmgr-vip daemon`: a level-triggered reconcile loop on every node.

Hooks fire once; networks and people do not wait for them. Each cycle takes a snapshot
(local role and timeline, every peer's view, the interface, ARP), asks `decide_cycle` what to
do, and acts. Peers are polled by one watcher thread each, so a dead host never stretches
the loop beyond its period.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from repmgr_vip import cluster
from repmgr_vip.config import Config
from repmgr_vip.decide import Action, Decision, Memory, Peer, Policy, Snapshot, decide_cycle
from repmgr_vip.errors import VipError
from repmgr_vip.fencing import fence_others
from repmgr_vip.lock import LockBusy, vip_lock
from repmgr_vip.log import LOG
from repmgr_vip.metrics import Metrics
from repmgr_vip.network import VipNetwork
from repmgr_vip.process import alive

PEER_TIMEOUT = 2.0
STATE_FILE = "repmgr-vip-daemon.json"
SELF_FENCE_FILE = "repmgr-vip-self-fenced"
CONFLICT_FENCE_EVERY = 10.0
LOCK_WAIT = 0.2


def self_fence_marker(config: Config) -> Path:
    return config.state_dir / SELF_FENCE_FILE


def state_file(config: Config) -> Path:
    return config.state_dir / STATE_FILE


def _age(path: Path) -> float | None:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None


def _surely_down(error: str) -> bool:
    text = error.lower()
    return "refused" in text or "no such file" in text


class PeerWatcher(threading.Thread):
    """Keeps the latest view of one peer; views older than `stale_after` count as unreachable."""

    def __init__(self, record: cluster.NodeRecord, interval: float, stop: threading.Event):
        super().__init__(daemon=True, name=f"peer-{record.node_name}")
        self.record = record
        self.interval = interval
        self.stop = stop
        self._latest: tuple[float, cluster.NodeView] | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            view = cluster.query_view(self.record.node_id, self.record.conninfo, PEER_TIMEOUT)
            with self._lock:
                self._latest = (time.monotonic(), view)
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def view(self, stale_after: float) -> cluster.NodeView:
        with self._lock:
            latest = self._latest
        if latest is None:
            return cluster.NodeView(self.record.node_id, reachable=False, error="not polled yet")
        at, view = latest
        if time.monotonic() - at > stale_after:
            return cluster.NodeView(self.record.node_id, reachable=False,
                                    error=f"no answer for {time.monotonic() - at:.1f} s")
        return view


@dataclass
class DaemonState:
    memory: Memory
    last_probe: float = 0.0
    last_announce: float = 0.0
    last_conflict_fence: float = 0.0


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.network = VipNetwork(config)
        self.stop_event = threading.Event()
        self.watchers: dict[int, PeerWatcher] = {}
        self.records: list[cluster.NodeRecord] = []
        self.policy = Policy(isolation_grace=effective_isolation_grace(config))
        self.state = DaemonState(Memory(majority_seen_at=time.monotonic()))
        self.metrics = Metrics(config.daemon.metrics_address, config.daemon.metrics_port)
        self.last_decision: Decision | None = None

    # --- snapshot ---------------------------------------------------------------------

    def _refresh_peers(self) -> None:
        """Re-reads repmgr.nodes when the local node answers; keeps the last list otherwise."""
        try:
            records = cluster.registered_nodes(self.config, timeout=PEER_TIMEOUT)
        except VipError:
            return
        others = [r for r in records if r.node_id != self.config.repmgr.node_id and r.active]
        self.records = others
        for record in others:
            watcher = self.watchers.get(record.node_id)
            if watcher is None or watcher.record.conninfo != record.conninfo:
                watcher = PeerWatcher(record, self.config.daemon.interval, self.stop_event)
                self.watchers[record.node_id] = watcher
                watcher.start()
        for node_id in set(self.watchers) - {r.node_id for r in others}:
            del self.watchers[node_id]

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        local = cluster.local_view(self.config, timeout=PEER_TIMEOUT)
        if local.reachable:
            self._refresh_peers()
        stale_after = max(3 * self.config.daemon.interval, PEER_TIMEOUT + 1)
        peers = tuple(Peer(r.node_id, r.node_name, r.node_type,
                           self.watchers[r.node_id].view(stale_after))
                      for r in self.records if r.node_id in self.watchers)
        state = self.network.interface_state()
        holds = state.address_as(self.config.vip.ip) is not None
        foreign: tuple[str, ...] | None = None
        if holds and now - self.state.last_probe >= self.config.daemon.conflict_probe_interval:
            try:
                foreign = self.network.probe().answered_by
            except VipError as exc:
                LOG.warning("conflict probe failed: %s", exc)
            self.state.last_probe = now
        reannounce = self.config.daemon.reannounce_interval
        return Snapshot(
            now=now, local=local, local_surely_down=_surely_down(local.error), peers=peers,
            holds_vip=holds, interface_up=state.up, foreign_macs=foreign,
            self_fence_age=_age(self_fence_marker(self.config)),
            reannounce_due=bool(reannounce) and now - self.state.last_announce >= reannounce,
        )

    # --- act --------------------------------------------------------------------------

    def act(self, decision: Decision, snapshot: Snapshot) -> None:
        if decision.action is Action.KEEP:
            return
        try:
            with vip_lock(self.config.lock_path, LOCK_WAIT):
                self._act_locked(decision, snapshot)
        except LockBusy:
            LOG.info("another repmgr-vip action is running; acting next cycle")

    def _act_locked(self, decision: Decision, snapshot: Snapshot) -> None:
        action = decision.action
        if action is Action.RELEASE:
            if self.network.remove():
                LOG.warning("released the VIP: %s", decision.reason)
                self.metrics.action("release")
        elif action is Action.ACQUIRE:
            probe = self.network.probe()
            if probe.in_use:
                self._conflict(probe.answered_by, f"not adding the VIP: {decision.reason}")
                return
            self.network.add()
            self.network.announce()
            self.state.last_announce = time.monotonic()
            LOG.warning("added the VIP: %s", decision.reason)
            self.metrics.action("acquire")
        elif action is Action.ANNOUNCE:
            self.network.announce()
            self.state.last_announce = time.monotonic()
            self.metrics.action("announce")
        elif action is Action.FENCE_CONFLICT:
            self._conflict(snapshot.foreign_macs or (), decision.reason)

    def _conflict(self, macs: tuple[str, ...], reason: str) -> None:
        LOG.error("VIP CONFLICT: %s (answering: %s)", reason, ", ".join(macs) or "?")
        self.metrics.conflict()
        now = time.monotonic()
        if now - self.state.last_conflict_fence < CONFLICT_FENCE_EVERY or not self.records:
            return
        self.state.last_conflict_fence = now
        report = fence_others(self.config, self.network, self.records)
        LOG.warning("conflict fencing: %s", report.summary())
        self.metrics.action("fence")

    # --- loop -------------------------------------------------------------------------

    def cycle(self) -> Decision:
        started = time.monotonic()
        snapshot = self.snapshot()
        decision, memory = decide_cycle(snapshot, self.state.memory, self.policy)
        self.state.memory = memory
        if snapshot.self_fence_age is not None and not memory.self_fenced:
            with contextlib.suppress(OSError):
                self_fence_marker(self.config).unlink()
                LOG.info("majority reachable again: self-fence lifted")
        if self.last_decision is None or decision.reason != self.last_decision.reason:
            LOG.info("%s: %s", decision.action.value, decision.reason)
        try:
            self.act(decision, snapshot)
        except VipError as exc:
            LOG.error("%s failed: %s", decision.action.value, exc)
            self.metrics.action(f"{decision.action.value}_failed")
        self.last_decision = decision
        holds = self.network.holds()
        self.metrics.observe(decision, snapshot, holds, time.monotonic() - started)
        self._write_state(decision, holds)
        return decision

    def _write_state(self, decision: Decision, holds: bool) -> None:
        data = {"pid": os.getpid(), "time": time.time(), "holds_vip": holds,
                "action": decision.action.value, "reason": decision.reason}
        path = state_file(self.config)
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(data), encoding="utf-8")
            tmp.replace(path)

    def run(self) -> int:
        def stop(signum: int, _frame: FrameType | None) -> None:
            LOG.info("signal %d: stopping", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        from repmgr_vip.reload import install_sighup, reload_daemon
        reload_requested = install_sighup()
        self.metrics.start()
        LOG.info("daemon started: VIP %s on %s, period %g s, isolation grace %g s, mode %s",
                 self.config.vip.cidr, self.config.vip.interface, self.config.daemon.interval,
                 self.policy.isolation_grace, self.network.mode)
        first = True
        while not self.stop_event.is_set():
            started = time.monotonic()
            if reload_requested.is_set():  # SIGHUP: re-read the configuration (reload.py)
                reload_requested.clear()
                reload_daemon(self)
            self.cycle()
            if first:
                sd_notify("READY=1")
                first = False
            if self.last_decision is not None:
                sd_notify(f"STATUS={self.last_decision.reason[:200]}")
            self.stop_event.wait(max(0.0, self.config.daemon.interval
                                     - (time.monotonic() - started)))
        sd_notify("STOPPING=1")
        if self.config.daemon.on_stop == "release":
            with contextlib.suppress(VipError), vip_lock(self.config.lock_path, 5.0):
                if self.network.remove():
                    LOG.warning("released the VIP on stop (daemon.on_stop = release)")
        else:
            LOG.info("stopped; VIP left as it is (daemon.on_stop = keep)")
        with contextlib.suppress(OSError):
            state_file(self.config).unlink()
        return 0


def effective_isolation_grace(config: Config) -> float:
    """Configured grace, or half of repmgr's own failure detection time (attempts x interval)."""
    if config.daemon.isolation_grace > 0:
        return config.daemon.isolation_grace
    detection = config.repmgr.reconnect_attempts * config.repmgr.reconnect_interval
    return max(1.0, detection / 2)


def sd_notify(message: str) -> None:
    """systemd's readiness protocol: one datagram to $NOTIFY_SOCKET, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def daemon_pid(config: Config) -> int | None:
    """The pid of a running daemon for this config, from its state file, checked in /proc."""
    try:
        pid = int(json.loads(state_file(config).read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if alive(pid) else None
