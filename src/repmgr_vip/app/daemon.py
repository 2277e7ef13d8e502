"""`repmgr-vip daemon`: a level-triggered reconcile loop on every node.

Hooks fire once; networks and people do not wait for them. Each cycle takes a snapshot
(local role and timeline, every peer's view, the interface, ARP), asks `decide_cycle` what to
do, and acts. Peers are polled by one watcher thread each, so a dead host never stretches
the loop beyond its period.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Generic, TypeVar

from repmgr_vip.adapters import cluster, control, pgsession, sshmux, statefiles
from repmgr_vip.adapters.link import LinkRelease
from repmgr_vip.adapters.lock import LockBusy
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.network import VipNetwork
from repmgr_vip.adapters.process import alive
from repmgr_vip.adapters.system import SYSTEM_CLOCK, FileState, NoLease
from repmgr_vip.app import claim, hooks
from repmgr_vip.app.fencing import HOLDER_LAST, PriorProof, SshRelease, fence_others
from repmgr_vip.app.lease import LeaseKeeper
from repmgr_vip.app.metrics import Metrics
from repmgr_vip.app.replica import start_replica_keeper
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config, keep_while_down
from repmgr_vip.core import ports
from repmgr_vip.core.decide import (
    CONFLICT,
    Action,
    Decision,
    Memory,
    Peer,
    Policy,
    Snapshot,
    decide_cycle,
)
from repmgr_vip.core.errors import CommandFailed, VipError
from repmgr_vip.core.model import InterfaceState, NodeRecord

PEER_TIMEOUT = 2.0
STATE_FILE = statepaths.DAEMON_STATE
SELF_FENCE_FILE = statepaths.SELF_FENCE
CONFLICT_FENCE_EVERY = 10.0
LOCK_WAIT = 0.2
NODE_LIST_WAIT = 3.0  # a promotion's fresh repmgr.nodes on the kept connection (a hook's too)
CONTROL_OPS = ("promote", "start-repmgrd", "follow", "fence-self", "event", "release")
CONTROL_STOP_WAIT = 10.0  # on stop, steps under way get this long to finish (then the hook)
REFUSAL_LOG_EVERY = 60.0  # a refused peer is counted each time, logged at most this often
LOOMING_EVERY = 0.15  # seconds between proofs while a failover looms (each takes 80 ms)
LOOMING_MARGIN = 10.0  # proofs stop this long after the old holder has let the VIP go
T = TypeVar("T")


class SnapshotFailed(VipError):
    """A cycle could not see the facts it needs; it does nothing and the next one retries."""


def self_fence_marker(config: Config) -> Path:
    return statepaths.self_fence_marker(config.state_dir)


def state_file(config: Config) -> Path:
    return statepaths.daemon_state_file(config.state_dir)


class SingleFlight(Generic[T]):
    """At most one call of fn at a time; a caller waits a bounded time for its result.

    A frozen or stalled server must never stretch the daemon's cycle: while the previous
    call still hangs, the caller gets `on_timeout` at once instead of a second hung call.
    """

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self.fn = fn
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future[T] | None = None
        self._started = 0.0

    def call(self, wait: float) -> tuple[T | None, float]:
        """(result, 0) or (None, seconds the pending call has been running)."""
        if self._pending is None:
            self._pending = self._pool.submit(self.fn)
            self._started = time.monotonic()
        try:
            result = self._pending.result(timeout=wait)
        except FutureTimeout:
            return None, time.monotonic() - self._started
        except Exception:
            self._pending = None  # a failed call is over too: the next call tries again
            raise
        self._pending = None
        return result, 0.0


class DaemonNode(hooks.SystemNode):
    """The hooks' LocalNode inside the daemon: its own node's role and repmgr.nodes on its
    kept connection (a fresh one costs a promotion's fencing round 10-20 ms, and a new
    backend every poll while PostgreSQL promotes); the rest as a hook has it."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon.config)
        self.daemon = daemon

    def view(self, timeout: float) -> cluster.NodeView:
        """On the kept connection, not a new backend every poll while PostgreSQL promotes."""
        view, waited = self.daemon.local_query.call(timeout)
        if view is None:
            return cluster.NodeView(self.config.repmgr.node_id, reachable=False,
                                    error=f"no answer for {waited:.1f} s")
        return view

    def others(self, cached: bool = False) -> list[NodeRecord]:
        if cached:
            return super().others(cached=True)
        records, waited = self.daemon.node_list.call(NODE_LIST_WAIT)
        if records is None:
            raise CommandFailed(f"repmgr.nodes gave no answer within {waited:.1f} s")
        me = self.config.repmgr.node_id
        return [r for r in records if r.node_id != me]


class LoomingProof(threading.Thread):
    """While no primary answers, proves who answers for the VIP every LOOMING_EVERY s, so a
    promotion handed to this daemon finds a proof that ended a moment ago (fencing.PRIOR_FRESH)
    and can take the VIP the instant the old holder confirms its release: no dark window.
    Probing stops when the failover is over, and after `limit` seconds of a primary missing
    (the old holder's daemon has let the VIP go by then: daemon.keep_while_down)."""

    def __init__(self, probe: Callable[[], tuple[str, ...]], limit: float,
                 stop: threading.Event) -> None:
        super().__init__(daemon=True, name="looming-proof")
        self.probe = probe
        self.limit = limit
        self.stop_event = stop
        self.wake = threading.Event()  # set while a failover looms (and to stop)
        self.since: float | None = None
        self.latest: PriorProof | None = None

    def looming(self, now_looming: bool) -> None:
        if now_looming:
            if self.since is None:
                self.since = time.monotonic()
            self.wake.set()
        else:
            self.since, self.latest = None, None
            self.wake.clear()

    def stop(self) -> None:
        self.wake.set()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.wake.wait()
            since = self.since
            if self.stop_event.is_set():
                return
            if since is None or time.monotonic() - since > self.limit:
                self.stop_event.wait(LOOMING_EVERY)
                continue
            try:
                self.latest = (time.monotonic(), self.probe())
            except VipError as exc:
                LOG.warning("ARP proof ahead of a failover failed: %s", exc)
                self.latest = None
            self.stop_event.wait(LOOMING_EVERY)


class PeerWatcher(threading.Thread):
    """Keeps the latest view of one peer; views older than `stale_after` count as unreachable."""

    def __init__(self, record: NodeRecord, interval: float, stop: threading.Event):
        super().__init__(daemon=True, name=f"peer-{record.node_id}")
        self.record = record
        self.interval = interval
        self.daemon_stop = stop
        self.retired = threading.Event()  # the node left repmgr.nodes or changed conninfo
        self._latest: tuple[float, cluster.NodeView] | None = None
        self._lock = threading.Lock()
        self.session = pgsession.NodeSession(record.conninfo, PEER_TIMEOUT, interval,
                                             f"node {record.node_id}")

    def _stopped(self) -> bool:
        return self.daemon_stop.is_set() or self.retired.is_set()

    def run(self) -> None:
        while not self._stopped():
            started = time.monotonic()
            # in this thread, no helper: a peer that stops answering leaves `_latest` to age,
            # and view() counts it unreachable after `stale_after`, as a timed-out query would
            view = self.session.view(self.record.node_id, bounded=False)
            with self._lock:
                self._latest = (time.monotonic(), view)
            self.retired.wait(max(0.0, self.interval - (time.monotonic() - started)))
        self.session.close()

    def retire(self) -> None:
        self.retired.set()

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
    # a standby whose primary is gone proves each period who answers for the VIP, so that a
    # promotion handed to it can take the VIP the moment the old holder confirms (fencing)
    prior_proof: PriorProof | None = None


class DaemonViews:
    """The NodeViews port over the daemon's own watchers, local query and node list."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def local(self) -> cluster.NodeView:
        return self.daemon._local_view()

    def local_surely_down(self) -> bool:
        return cluster.refuses_connections(self.daemon.config.repmgr.conninfo)

    def refresh(self) -> None:
        self.daemon._refresh_peers()

    def peers(self) -> tuple[Peer, ...]:
        d = self.daemon
        stale_after = max(3 * d.config.daemon.interval, PEER_TIMEOUT + 1)
        return tuple(Peer(r.node_id, r.node_name, r.node_type,
                          d.watchers[r.node_id].view(stale_after))
                     for r in d.records if r.node_id in d.watchers)

    def nodes(self) -> list[NodeRecord]:
        return list(self.daemon.records)


class Daemon:
    """The reconcile loop. The ports default to the real host; tests pass fakes
    (repmgr_vip.testing), and `remote`, `fence_runner`, `prober` go to conflict fencing."""

    def __init__(self, config: Config, *, network: ports.VipAddress | None = None,
                 views: ports.NodeViews | None = None, clock: ports.Clock | None = None,
                 files: ports.StateFiles | None = None, lease: ports.Lease | None = None,
                 remote: ports.RemoteRelease | None = None,
                 fence_runner: ports.FenceRunner | None = None,
                 prober: ports.ProberFactory | None = None) -> None:
        self.config = config
        self.clock = clock if clock is not None else SYSTEM_CLOCK
        # the LAN proof (daemon.lan_proof, default on): every proof the daemon runs
        # (acquire, conflict probe, a fencing round) takes 80 ms on its own raw socket
        # instead of vip.probe_count x vip.probe_timeout
        lan_proof = config.daemon.lan_proof
        self.network: ports.VipAddress = (network if network is not None
                                          else VipNetwork(config, lan_proof=lan_proof))
        self.files: ports.StateFiles = files if files is not None else FileState(config)
        if remote is None:  # peers' daemons over the warm links, else ssh exec (link.py)
            remote = LinkRelease(lambda: self.config, lambda: SshRelease(self.config))
        self.remote: ports.RemoteRelease = remote
        self.fencing_ports = {"remote": remote, "clock": clock, "fence_runner": fence_runner,
                              "prober": prober, "prior_proof": self._prior_proof,
                              "holder_last": HOLDER_LAST}
        self.stop_event = threading.Event()
        self.watchers: dict[int, PeerWatcher] = {}
        self.records: list[NodeRecord] = []
        self.policy = Policy(isolation_grace=effective_isolation_grace(config),
                             release_request_hold=2.5 * config.daemon.interval,
                             keep_while_down=keep_while_down(config))
        self.state = DaemonState(Memory(majority_seen_at=self.clock.monotonic()))
        self.metrics = Metrics(config.daemon.metrics_address, config.daemon.metrics_port)
        self.last_decision: Decision | None = None
        # one kept connection for the local node: the steady state starts no backend
        self.local_session = pgsession.NodeSession(
            config.repmgr.conninfo, PEER_TIMEOUT, config.daemon.interval, "local node")
        self.local_query = SingleFlight(
            lambda: self.local_session.view(config.repmgr.node_id), "local-query")
        self.node_list = SingleFlight(
            lambda: pgsession.registered_nodes(self.local_session, config), "node-list")
        self.node_gate = pgsession.NodeListGate()
        self.local_latest = cluster.NodeView(config.repmgr.node_id, reachable=False)
        self.seen_interface: InterfaceState | None = None  # this cycle's snapshot read it
        # warm SSH links for the hooks' remote releases (a thread: never blocks the cycle)
        self.ssh_keeper = sshmux.MasterKeeper(lambda: self.config,
                                              lambda: [r.host for r in self.records],
                                              self.stop_event, peers=lambda: self.records)
        # hooks' entries written before this daemon started are history, not news
        self.journal_offset = self.files.read_journal(0)[1]
        self.views: ports.NodeViews = views if views is not None else DaemonViews(self)
        if lease is None:  # the kernel lease of a real address; a fake has none
            real = self.network if isinstance(self.network, VipNetwork) else None
            lease = LeaseKeeper(config, real, self.metrics) if real else NoLease()
        self.lease = lease
        self.control: control.ControlServer | None = None  # see serve_control
        self.looming_proof: LoomingProof | None = None  # see run(); None: once per cycle
        self.promoting = threading.Event()  # a promotion handed to us is under way
        self.refusal_logged = -REFUSAL_LOG_EVERY

    # --- snapshot ---------------------------------------------------------------------

    def _refresh_peers(self) -> None:
        """Re-reads repmgr.nodes without ever waiting on it; keeps the last list meanwhile.

        A DBA's lock on repmgr.nodes or a stalled server delays only the list, not the cycle.
        Read only when it can have changed (see pgsession.NodeListGate).
        """
        now = time.monotonic()
        views = [self.local_latest,
                 *(w.view(self._stale_after()) for w in self.watchers.values())]
        if not self.node_gate.due(now, views):
            return
        try:
            records, _ = self.node_list.call(wait=0.0 if self.records else 0.5)
        except VipError:
            return
        if records is None:
            return
        self.node_gate.read(now, views)
        others = [r for r in records if r.node_id != self.config.repmgr.node_id and r.active]
        self.records = others
        for record in others:
            watcher = self.watchers.get(record.node_id)
            if watcher is None or watcher.record.conninfo != record.conninfo:
                if watcher is not None:
                    watcher.retire()
                watcher = PeerWatcher(record, self.config.daemon.interval, self.stop_event)
                self.watchers[record.node_id] = watcher
                watcher.start()
        for node_id in set(self.watchers) - {r.node_id for r in others}:
            self.watchers.pop(node_id).retire()

    def _stale_after(self) -> float:
        return max(3 * self.config.daemon.interval, PEER_TIMEOUT + 1)

    def _local_view(self) -> cluster.NodeView:
        # a slow but healthy server gets a moment; a frozen one costs at most this per cycle
        wait = min(PEER_TIMEOUT, max(0.5, 1.5 * self.config.daemon.interval))
        view, waited = self.local_query.call(wait)
        if view is None:
            view = cluster.NodeView(self.config.repmgr.node_id, reachable=False,
                                    error=f"no answer for {waited:.1f} s")
        self.local_latest = view  # for the node list's "can it have changed" (NodeListGate)
        return view

    def snapshot(self) -> Snapshot:
        now = self.clock.monotonic()
        local = self.views.local()
        if local.reachable:
            self.views.refresh()
        surely_down = not local.reachable and self.views.local_surely_down()
        peers = self.views.peers()
        try:
            state = self.network.interface_state()
        except VipError as exc:  # unreadable `ip` output: act on nothing, look again next cycle
            LOG.error("cannot read interface %s: %s; retrying next cycle",
                      self.config.vip.interface, exc)
            raise SnapshotFailed(str(exc)) from exc
        self.seen_interface = state
        holds = state.holds_all(self.config.vip.cidrs)  # every address (dual stack)
        foreign: tuple[str, ...] | None = None
        if holds and now - self.state.last_probe >= self.config.daemon.conflict_probe_interval:
            try:
                foreign = self.network.probe().answered_by
            except VipError as exc:
                LOG.warning("conflict probe failed: %s", exc)
            self.state.last_probe = now
        looming = bool(local.reachable and local.in_recovery and not holds and not any(
            p.is_data_primary for p in peers))
        if self.looming_proof is not None:
            self.looming_proof.looming(looming)
        elif looming:
            self._prove_before_failover()
        if looming:
            self._prepare_links()
        reannounce = self.config.daemon.reannounce_interval
        return Snapshot(
            now=now, local_name=self.config.repmgr.node_name, local=local,
            local_surely_down=surely_down, peers=peers,
            holds_vip=holds, interface_up=state.up, foreign_macs=foreign,
            self_fence_age=self.files.marker_age(),
            release_request_age=self.files.release_request_age(),
            promoting=self.promoting.is_set(),
            reannounce_due=bool(reannounce) and now - self.state.last_announce >= reannounce,
        )

    def _prior_proof(self) -> PriorProof | None:
        if self.looming_proof is not None:
            return self.looming_proof.latest
        return self.state.prior_proof

    def _prepare_links(self) -> None:
        """No primary answers: keep a greeted link open to every peer, so that a promotion
        handed to this daemon asks each one in a single round trip (link.PreparedLink)."""
        remote = self.remote
        if isinstance(remote, ports.PreparingRelease):
            for record in self.views.nodes():
                if record.host:
                    remote.prepare(record)

    def _prove_before_failover(self) -> None:
        """No primary answers: repmgrd may promote this standby any moment. Who answers for
        the VIP now (the old holder, whose daemon keeps it while its PostgreSQL is down) is
        what the promotion's fencing round needs to know before the release, not after it."""
        try:
            answered = self.network.probe().answered_by
        except VipError as exc:
            LOG.warning("ARP proof ahead of a failover failed: %s", exc)
            self.state.prior_proof = None
            return
        self.state.prior_proof = (self.clock.monotonic(), answered)

    # --- act --------------------------------------------------------------------------

    def act(self, decision: Decision, snapshot: Snapshot) -> None:
        if decision.action is Action.KEEP:
            return
        conflict: tuple[tuple[str, ...], str] | None = None
        try:
            with self.files.lock(LOCK_WAIT):
                if self._promoted_since(decision, snapshot):
                    LOG.info("PostgreSQL left recovery since this cycle looked: deciding again")
                    return
                conflict = self._act_locked(decision, snapshot)
        except LockBusy:
            LOG.info("another repmgr-vip action is running; acting next cycle")
        if conflict is not None:
            # outside the lock: the other holder's daemon may be asking us the same thing at
            # this very moment, and its release over SSH needs our lock
            self._conflict(*conflict)

    def _promoted_since(self, decision: Decision, snapshot: Snapshot) -> bool:
        """A standby's VIP is released only if it is still a standby under the lock: a
        promotion adds the VIP before `repmgr standby promote` and may have ended between
        this cycle's snapshot and the lock it held meanwhile."""
        if decision.action is not Action.RELEASE or not snapshot.local.in_recovery:
            return False
        now = self.views.local()
        return now.reachable and not now.in_recovery

    def _act_locked(self, decision: Decision,
                    snapshot: Snapshot) -> tuple[tuple[str, ...], str] | None:
        """Acts on the local VIP; returns a conflict to fence once the lock is released."""
        action = decision.action
        if action is Action.RELEASE:
            if claim.release(self.network):
                LOG.warning("released the VIP: %s", decision.reason)
                self.metrics.action("release")
                self._journal("release", decision.reason, outcome="released")
        elif action is Action.ACQUIRE:
            result = claim.claim(self.network, proof=claim.arp_proof(self.network))
            if not result.ok:
                self._journal("refuse", f"not adding the VIP: {decision.reason}",
                              alarm=CONFLICT, answered_by=list(result.answered_by))
                return result.answered_by, f"not adding the VIP: {decision.reason}"
            self.state.last_announce = self.clock.monotonic()
            LOG.warning("added the VIP: %s", decision.reason)
            self.metrics.action("acquire")
            self._journal("acquire", decision.reason, outcome="held")
        elif action is Action.ANNOUNCE:
            self.network.announce()
            self.state.last_announce = self.clock.monotonic()
            self.metrics.action("announce")
        elif action is Action.FENCE_CONFLICT:
            return snapshot.foreign_macs or (), decision.reason
        return None

    def _conflict(self, macs: tuple[str, ...], reason: str) -> None:
        LOG.error("VIP CONFLICT: %s (answering: %s)", reason, ", ".join(macs) or "?")
        self.metrics.conflict()
        now = self.clock.monotonic()
        nodes = self.views.nodes()
        if now - self.state.last_conflict_fence < CONFLICT_FENCE_EVERY or not nodes:
            return
        self.state.last_conflict_fence = now
        report = fence_others(self.config, self.network, nodes, **self.fencing_ports)
        LOG.warning("conflict fencing: %s", report.summary())
        self.metrics.action("fence")
        self._journal("fence", reason, alarm=CONFLICT, answering=list(macs),
                      released=report.released, fenced=report.fenced,
                      still_answering=list(report.answered_by))

    # --- loop -------------------------------------------------------------------------

    def cycle(self) -> Decision | None:
        started = self.clock.monotonic()
        try:
            snapshot = self.snapshot()
        except SnapshotFailed:
            self.metrics.action("snapshot_failed")
            return None
        decision, memory = decide_cycle(snapshot, self.state.memory, self.policy)
        self.state.memory = memory
        asked = snapshot.release_request_age
        if asked is not None and asked >= self.policy.release_request_hold:
            with contextlib.suppress(OSError):
                self.files.clear_release_request()
        if snapshot.self_fence_age is not None and not memory.self_fenced:
            with contextlib.suppress(OSError):
                self.files.clear_marker()
                LOG.info("majority reachable again: self-fence lifted")
        if self.last_decision is None or decision.reason != self.last_decision.reason:
            level = logging.ERROR if decision.alarm else logging.INFO
            LOG.log(level, "%s: %s", decision.action.value, decision.reason)
            self._journal(decision.action.value, decision.reason, alarm=decision.alarm,
                          holds=snapshot.holds_vip, local=_view_text(snapshot.local),
                          peers={p.node_name: _view_text(p.view) for p in snapshot.peers},
                          foreign=list(snapshot.foreign_macs or ()))
        self._count_hook_alarms()
        try:
            self.act(decision, snapshot)
        except VipError as exc:
            LOG.error("%s failed: %s", decision.action.value, exc)
            self.metrics.action(f"{decision.action.value}_failed")
        self.last_decision = decision
        self.lease.tick(decision)  # vip.lease > 0: renew unless releasing
        try:
            # KEEP and REFUSE changed nothing here: the snapshot's read is a moment old (a
            # lease renewed too late removes the VIP; the next cycle shows that)
            state = (self.seen_interface if self.seen_interface is not None and
                     decision.action in (Action.KEEP, Action.REFUSE)
                     else self.network.interface_state())
            held = state.held_map(self.config.vip.cidrs)
            holds = all(held.values())
            self.metrics.addresses(held)
        except VipError:  # unreadable `ip` output: report what the snapshot saw
            holds = snapshot.holds_vip
        self.metrics.observe(decision, snapshot, holds, self.clock.monotonic() - started)
        self._write_state(decision, holds)
        return decision

    def _journal(self, action: str, reason: str, **kw: Any) -> None:
        self.files.journal(self.config.repmgr.node_name, "daemon", action, reason, **kw)

    def _count_hook_alarms(self) -> None:
        """Refusals and conflicts seen by hooks (short-lived processes) show in our metrics."""
        entries, self.journal_offset = self.files.read_journal(self.journal_offset)
        for entry in entries:
            if entry.get("pid") == os.getpid() and entry.get("source") == "daemon":
                continue  # counted when it happened; hooks' steps run here are counted now
            if entry.get("alarm") == CONFLICT:
                self.metrics.conflict()
            if entry.get("action") in ("refuse", "refused"):
                self.metrics.action(f"{entry.get('source', 'hook')}_refused")

    # --- the control socket: hooks hand their VIP steps to us ---------------------------

    def serve_control(self, path: Path | None = None) -> bool:
        """Listens on the state directory's control socket (hooks.py explains the fast path);
        False if it cannot, and then every hook simply does its own VIP step."""
        server = control.ControlServer(
            path or statepaths.control_socket(self.config.state_dir), self._serve_request,
            allowed_uids={os.geteuid(), 0}, on_refused=self._refused,
            replayable=("start-repmgrd", "follow", "fence-self", "event", "release"))
        try:
            server.bind()
        except OSError as exc:
            LOG.error("control socket %s not served (%s): hooks do their VIP steps themselves",
                      server.path, exc.strerror or exc)
            return False
        server.start()
        self.control = server
        return True

    def _serve_request(self, request: dict[str, Any], conv: control.Conversation,
                       peer: control.Peer) -> None:
        """One hook's step, in the request's own thread: the cycle keeps running meanwhile,
        and acts only when the step has let go of the VIP lock."""
        op = request.get("op")
        if op in CONTROL_OPS:
            self.metrics.action(f"control_{op}")
        LOG.info("control: %s for pid %d", op, peer.pid)
        # a peer's release writes its hold where our cycle reads it (our StateFiles port)
        # its kept connection exists with its own views (injected ones have none)
        node = DaemonNode(self) if isinstance(self.views, DaemonViews) else None
        hands = hooks.Hands(self.network, self.files.lock, via="daemon",
                            fencing=self.fencing_ports, node=node,
                            files=self.files if op == "release" else None)
        if op != "promote":
            hooks.serve(self.config, hands, request, conv)
            return
        self.promoting.set()
        try:
            hooks.serve(self.config, hands, request, conv)
        finally:
            self.promoting.clear()

    def _refused(self, peer: control.Peer) -> None:
        """A user other than ours or root knocked: refused, counted, logged now and then."""
        self.metrics.action("control_refused")
        now = time.monotonic()
        if now - self.refusal_logged >= REFUSAL_LOG_EVERY:
            self.refusal_logged = now
            LOG.warning("control socket: refused pid %d of uid %d (only uid %d and root may "
                        "use it)", peer.pid, peer.uid, os.geteuid())
            self._journal("control-refused", f"uid {peer.uid} may not use the control socket",
                          alarm="", uid=peer.uid, peer_pid=peer.pid)

    def _write_state(self, decision: Decision, holds: bool) -> None:
        data = {"pid": os.getpid(), "time": time.time(), "holds_vip": holds,
                "action": decision.action.value, "reason": decision.reason,
                "alarm": decision.alarm}
        with contextlib.suppress(OSError):  # status only; a full disk must not stop the loop
            self.files.write_state(json.dumps(data))

    def run(self) -> int:
        def stop(signum: int, _frame: FrameType | None) -> None:
            LOG.info("signal %d: stopping", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        from repmgr_vip.app.reload import install_sighup, reload_daemon
        reload_requested = install_sighup()
        self.metrics.start()
        self.ssh_keeper.start()
        self.serve_control()
        if isinstance(self.network, VipNetwork) and self.network.mode == "direct" and (
                self.config.daemon.lan_proof):  # a proof of 80 ms on our raw socket
            network = self.network
            self.looming_proof = LoomingProof(
                network.probe_all,
                keep_while_down(self.config) + LOOMING_MARGIN, self.stop_event)
            self.looming_proof.start()
        LOG.info("daemon started: VIP %s on %s, period %g s, isolation grace %g s, mode %s",
                 self.config.vip.cidr, self.config.vip.interface, self.config.daemon.interval,
                 self.policy.isolation_grace, self.network.mode)
        replica = start_replica_keeper(self.config, self)  # [replica_vip]: own thread, our sessions
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
            sd_notify("WATCHDOG=1")  # the unit's WatchdogSec restarts a loop that stopped
            self.stop_event.wait(max(0.0, self.config.daemon.interval
                                     - (time.monotonic() - started)))
        sd_notify("STOPPING=1")
        if self.looming_proof is not None:
            self.looming_proof.stop()
        if self.control is not None:  # from now on hooks do their steps themselves
            self.control.close(wait=CONTROL_STOP_WAIT)
        if replica is not None:
            replica.stop()
        if self.config.daemon.on_stop == "release":
            with contextlib.suppress(VipError), self.files.lock(5.0):
                if claim.release(self.network):
                    LOG.warning("released the VIP on stop (daemon.on_stop = release)")
                    self._journal("release", "daemon stopped (daemon.on_stop = release)",
                                  outcome="released")
        else:
            LOG.info("stopped; VIP left as it is (daemon.on_stop = keep)")
        with contextlib.suppress(OSError):
            statefiles.remove(state_file(self.config))
        return 0


def _view_text(view: cluster.NodeView) -> str:
    if not view.reachable:
        return f"unreachable: {view.error}"
    return f"{'standby' if view.in_recovery else 'primary'} tl {view.timeline}"


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
        pid = int(json.loads(statefiles.read_text(state_file(config)))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if alive(pid) else None
