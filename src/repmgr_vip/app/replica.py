"""The read-only replica VIP ([replica_vip]): one healthy standby holds it.

Eligible: a registered standby that the current primary lists as `streaming` in
pg_stat_replication (so it streams from the current primary) and whose replay is at most
`max_lag_bytes` behind the primary's current WAL position. A holder keeps it while it stays
eligible (no move for a better-ranked node: every move resets sessions); otherwise the first
eligible node by `prefer`, then by node id, takes it. Every node decides alone from what the
primary says, so two nodes can briefly both want it: an address is added only after a probe
found it free, and a node that is no longer eligible releases it within one period. With
`on_no_standby = "primary"` the primary holds it while no standby is eligible.

The daemon runs a ReplicaKeeper thread that reads the cluster through the daemon's kept
connections (DaemonSource: no new PostgreSQL session per period). A node that should hold it
but finds it answering elsewhere for two periods fences it through fencing.Fencing, as the
primary VIP does: `release --replica --unless-eligible` over SSH on every other node (a holder
whose daemon died gives it up; a still-eligible holder keeps it: exit 3), racing an ARP
prober. fence_command is never run for a read-only address. `promote` and the primary-role
events give the replica VIP up before taking the primary VIP (release_here). Both take and
give it up through claim.py, the one claim path of the primary VIP.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from repmgr_vip.adapters import cluster, pgsession
from repmgr_vip.adapters.lock import LockBusy, vip_lock
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.network import VipNetwork
from repmgr_vip.adapters.remote import remote_vip_command, start_remote
from repmgr_vip.app import claim
from repmgr_vip.app.fencing import FenceReport, Fencing
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config, ReplicaSettings
from repmgr_vip.core.errors import CommandFailed, ConfigError, ExitCode, VipError
from repmgr_vip.core.model import NodeRecord
from repmgr_vip.core.ports import ReleaseResult, ReleaseSession

if TYPE_CHECKING:
    from repmgr_vip.app.daemon import Daemon
    from repmgr_vip.app.metrics import Metrics

QUERY_TIMEOUT = 2.0
LOCK_WAIT = 0.5
FENCE_AFTER = 2  # periods the address may answer elsewhere before this node fences it
FENCE_EVERY = 10.0  # seconds between two fencing rounds for the replica VIP
DEFER_AFTER_KEPT = 30.0  # an eligible standby kept it: no SSH round for so long
SELF_TYPE_EVERY = 30.0
REPLICATION_QUERY = """
SELECT application_name, state, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint
  FROM pg_stat_replication
"""
RELEASE_ARGS = ("release", "--replica", "--unless-eligible")


@dataclass(frozen=True)
class Replication:
    """One row of the primary's pg_stat_replication."""

    name: str  # application_name: repmgr sets it to the node name
    state: str
    lag_bytes: int | None  # None: nothing replayed yet


def replica_config(config: Config) -> Config:
    """The config with [replica_vip]'s addresses as `vip` (probe, announce, sudo lines)."""
    assert config.replica is not None
    return dataclasses.replace(config, vip=config.replica.vip)


def replica_network(config: Config) -> VipNetwork | None:
    """The VipNetwork for [replica_vip], with its own announcer file; None when not set."""
    if config.replica is None:
        return None
    return VipNetwork(replica_config(config),
                      announcer_file=statepaths.announcer_pid_file(config.state_dir)
                      .with_name("repmgr-vip-replica-announcer.pid"))


def eligible(settings: ReplicaSettings, standbys: Sequence[str],
             rows: Sequence[Replication]) -> list[str]:
    """Eligible standbys, best first: `prefer` order, then the order of `standbys` (ids)."""
    ok = {r.name for r in rows if r.state == "streaming" and r.lag_bytes is not None
          and r.lag_bytes <= settings.max_lag_bytes}
    names = [name for name in standbys if name in ok]
    rank = {name: i for i, name in enumerate(settings.prefer)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), standbys.index(n)))


def should_hold(settings: ReplicaSettings, me: str, primary: str, standbys: Sequence[str],
                rows: Sequence[Replication], holds: bool) -> bool:
    """Whether this node should hold the replica VIP now."""
    good = eligible(settings, standbys, rows)
    if me in good:
        return holds or good[0] == me
    if not good and settings.on_no_standby == "primary":
        return me == primary
    return False


def _replication(rows: Sequence[Any]) -> list[Replication]:
    return [Replication(str(r[0]), str(r[1]), None if r[2] is None else int(r[2]))
            for r in rows]


class ClusterSource(Protocol):
    """What the keeper needs to know about the cluster, however it is read."""

    def local(self) -> cluster.NodeView: ...
    def nodes(self) -> list[NodeRecord]: ...  # active records, this node included
    def all_nodes(self) -> list[NodeRecord]: ...  # every registered node, read now (fencing)
    def views(self, nodes: Sequence[NodeRecord]) -> dict[int, cluster.NodeView]: ...
    def replication(self, primary: NodeRecord) -> list[Replication]: ...


class DirectSource:
    """Fresh connections (the remote `release --unless-eligible`, a one-off question)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def local(self) -> cluster.NodeView:
        return cluster.local_view(self.config, timeout=QUERY_TIMEOUT)

    def nodes(self) -> list[NodeRecord]:
        return [r for r in cluster.registered_nodes(self.config, QUERY_TIMEOUT) if r.active]

    def all_nodes(self) -> list[NodeRecord]:
        return cluster.registered_nodes(self.config, QUERY_TIMEOUT)

    def views(self, nodes: Sequence[NodeRecord]) -> dict[int, cluster.NodeView]:
        return cluster.query_views(nodes, QUERY_TIMEOUT)

    def replication(self, primary: NodeRecord) -> list[Replication]:
        def rows() -> list[Any]:
            with cluster.connect(primary.conninfo, QUERY_TIMEOUT) as conn:
                found: list[Any] = conn.execute(REPLICATION_QUERY).fetchall()
            return found

        return _replication(cluster.with_deadline(rows, QUERY_TIMEOUT + 1.0,
                                                  "pg_stat_replication"))


class DaemonSource:
    """The daemon's kept connections and peer watchers: the steady state opens no session.

    The local view is the one the daemon's last cycle took; peers' views come from its
    watchers; pg_stat_replication is read on the kept connection to the primary; this node's
    own record (its type) is re-read on the kept local connection every 30 s.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._self: NodeRecord | None = None
        self._self_at = 0.0

    def local(self) -> cluster.NodeView:
        return self.daemon.local_latest

    def _own_record(self) -> NodeRecord | None:
        now = time.monotonic()
        if self._self is None or now - self._self_at >= SELF_TYPE_EVERY:
            me = self.daemon.config.repmgr.node_id
            records = pgsession.registered_nodes(self.daemon.local_session, self.daemon.config)
            self._self = next((r for r in records if r.node_id == me), None)
            self._self_at = now
        return self._self

    def nodes(self) -> list[NodeRecord]:
        own = self._own_record()
        return [*([own] if own is not None and own.active else []), *self.daemon.records]

    def all_nodes(self) -> list[NodeRecord]:
        """Read now on the kept local connection, inactive nodes too: a node that repmgr
        marked inactive (its PostgreSQL is down) can still hold the address."""
        return pgsession.registered_nodes(self.daemon.local_session, self.daemon.config)

    def views(self, nodes: Sequence[NodeRecord]) -> dict[int, cluster.NodeView]:
        me = self.daemon.config.repmgr.node_id
        stale = self.daemon._stale_after()
        out = {}
        for record in nodes:
            watcher = self.daemon.watchers.get(record.node_id)
            if record.node_id == me:
                out[me] = self.local()
            elif watcher is not None:
                out[record.node_id] = watcher.view(stale)
        return out

    def replication(self, primary: NodeRecord) -> list[Replication]:
        if primary.node_id == self.daemon.config.repmgr.node_id:
            session = self.daemon.local_session
        else:
            watcher = self.daemon.watchers.get(primary.node_id)
            if watcher is None:
                raise CommandFailed(f"no kept connection to the primary {primary.node_name} yet")
            session = watcher.session
        return _replication(session.fetch(REPLICATION_QUERY))


def want(config: Config, source: ClusterSource, holds: bool) -> bool | None:
    """Whether this node should hold the replica VIP; None when the cluster cannot be read
    (keep things as they are)."""
    assert config.replica is not None
    me = config.repmgr.node_name
    local = source.local()
    if not local.reachable:
        return False  # our PostgreSQL is down: no reads can be served here
    records = sorted(source.nodes(), key=lambda r: r.node_id)  # the stable rule: node id
    data = [r for r in records if r.node_type != "witness"]
    views = source.views(data)
    primaries = [r for r in data if views.get(r.node_id) is not None
                 and views[r.node_id].is_primary]
    if len(primaries) != 1:
        return None
    primary = primaries[0]
    if local.is_primary and primary.node_name != me:
        return False
    rows = source.replication(primary)
    standbys = [r.node_name for r in records if r.node_type == "standby"]
    if not local.is_primary and me not in standbys:
        standbys.append(me)
    return should_hold(config.replica, me, primary.node_name, standbys, rows, holds)


class _Noted:
    """A release session that tells its owner which node kept the address (exit 3)."""

    def __init__(self, session: ReleaseSession, node: str, kept: set[str]) -> None:
        self.session, self.node, self.kept = session, node, kept

    def finished(self) -> bool:
        return self.session.finished()

    def result(self) -> ReleaseResult:
        result = self.session.result()
        if result.returncode == ExitCode.REFUSED:
            self.kept.add(self.node)
        return result

    def kill(self) -> None:
        self.session.kill()


class SshReplicaRelease:
    """fencing's RemoteRelease for the replica VIP: `release --replica --unless-eligible`;
    `kept` names the nodes that kept it because they are still eligible standbys."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.kept: set[str] = set()

    def start_release(self, node: NodeRecord) -> ReleaseSession:
        argv = remote_vip_command(self.config, node.node_name, node.node_id, *RELEASE_ARGS)
        return _Noted(start_remote(self.config, node.host, argv), node.node_name, self.kept)


def fence_replica(config: Config, network: VipNetwork,
                  nodes: Sequence[NodeRecord], **ports: Any) -> FenceReport:
    """The primary VIP's fencing round (SSH releases racing an ARP prober) for the replica
    addresses; never a fence_command: a read-only address is not worth a power-off."""
    ports.setdefault("remote", SshReplicaRelease(config))
    ports.setdefault("fence_runner", lambda _node: False)
    fencing = Fencing(replica_config(config), network, nodes, **ports)
    try:
        return fencing.wait()
    finally:
        fencing.close()


class ReplicaKeeper(threading.Thread):
    """Places the replica VIP on this node or takes it away, once per daemon period."""

    def __init__(self, config: Config, network: VipNetwork, interval: float,
                 source: ClusterSource | None = None, metrics: Metrics | None = None) -> None:
        super().__init__(daemon=True, name="replica-vip")
        assert config.replica is not None
        self.config = config
        self.settings: ReplicaSettings = config.replica
        self.network = network
        self.interval = interval
        self.source: ClusterSource = source if source is not None else DirectSource(config)
        self.stopped = threading.Event()
        self.last_note = ""
        self.refused = 0  # consecutive periods it answered elsewhere while we wanted it
        self.last_fence = -FENCE_EVERY
        self.deferred_until = 0.0  # an eligible standby holds it (stickiness across nodes)
        self.metrics = metrics

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.tick()
            except VipError as exc:
                self._note(f"replica VIP: {exc}")
            except Exception as exc:  # keep the thread (and the primary VIP's daemon) alive
                self._note(f"replica VIP: unexpected {type(exc).__name__}: {exc}")

    def stop(self) -> None:
        """Stops placing it and gives it up: only a running daemon would ever move it on."""
        self.stopped.set()
        self.join(timeout=10)
        try:
            with vip_lock(self.config.lock_path, 5.0):
                if claim.release(self.network):
                    LOG.warning("replica VIP %s released: the daemon stops",
                                self.settings.vip.cidr)
        except (VipError, LockBusy) as exc:
            LOG.error("replica VIP not released on stop: %s", exc)

    def _note(self, text: str) -> None:
        if text != self.last_note:
            LOG.warning("%s", text)
            self.last_note = text

    def want(self) -> bool | None:
        return want(self.config, self.source, self.network.holds())

    def _observe(self) -> None:
        if self.metrics is not None:
            state = self.network.interface_state()
            self.metrics.replica(state.held_map(self.settings.vip.cidrs))

    def tick(self) -> None:
        try:
            self._tick()
        finally:
            self._observe()

    def _tick(self) -> None:
        wanted = self.want()
        held = self.network.holds()
        if wanted is None:
            self._note("replica VIP: no single primary visible; leaving it as it is")
            return
        if not wanted:
            self.refused = 0
        if wanted == held:
            return
        try:
            with vip_lock(self.config.lock_path, LOCK_WAIT):
                if not wanted:
                    if claim.release(self.network):
                        LOG.warning("replica VIP %s released", self.settings.vip.cidr)
                    return
                result = claim.claim(self.network, proof=claim.arp_proof(self.network))
        except LockBusy:
            return
        if result.ok:
            self.refused = 0
            LOG.warning("replica VIP %s added", self.settings.vip.cidr)
            return
        self.refused += 1
        self._note(f"replica VIP {self.settings.vip.cidr} still answers from "
                   f"{', '.join(result.answered_by)}; waiting for its release")
        if self.refused >= FENCE_AFTER:
            self._fence()

    def _fence(self) -> None:
        """The holder did not give it up by itself (its daemon is dead, or it is cut off):
        ask every other node over SSH, as the primary VIP's fencing does."""
        now = time.monotonic()
        if now - self.last_fence < FENCE_EVERY or now < self.deferred_until:
            return  # (deferred: an eligible standby said it keeps it; the probe still runs,
            # so the address is taken as soon as that standby gives it up)
        self.last_fence = now
        me = self.config.repmgr.node_id
        try:
            nodes = self.source.all_nodes()
        except VipError as exc:
            LOG.warning("replica VIP fencing with the cached node list: %s", exc)
            nodes = cluster.cached_nodes(self.config)
        others = [r for r in nodes if r.node_id != me]
        if not others:
            return
        LOG.warning("replica VIP fencing: asking %s to release it unless eligible",
                    ", ".join(r.node_name for r in others))
        remote = SshReplicaRelease(self.config)
        report = fence_replica(self.config, self.network, others, remote=remote)
        LOG.warning("replica VIP fencing: %s", report.summary())
        if remote.kept:
            self.deferred_until = time.monotonic() + DEFER_AFTER_KEPT
            self.refused = 0
            LOG.warning("replica VIP: %s keeps it as an eligible standby; no fencing for %g s "
                        "(taken as soon as it is free)", ", ".join(sorted(remote.kept)),
                        DEFER_AFTER_KEPT)


def unknown_prefer(config: Config, names: Sequence[str]) -> str | None:
    """The first replica_vip.prefer name not among `names` (the registered nodes)."""
    if config.replica is None:
        return None
    return next((name for name in config.replica.prefer if name not in set(names)), None)


def prefer_error(name: str) -> str:
    return (f"replica_vip.prefer names {name!r}, which is not a registered node; use node "
            "names from `repmgr cluster show` or remove it")


def check_prefer(config: Config) -> None:
    """replica_vip.prefer must name registered nodes (exit 2); unknown when PostgreSQL is
    down, then the keeper simply ranks unknown names last."""
    if config.replica is None or not config.replica.prefer:
        return
    try:
        names = [r.node_name for r in cluster.registered_nodes(config, QUERY_TIMEOUT)]
    except VipError:
        return
    unknown = unknown_prefer(config, names)
    if unknown is not None:
        raise ConfigError(prefer_error(unknown))


def start_replica_keeper(config: Config, daemon: Daemon | None = None) -> ReplicaKeeper | None:
    """The keeper thread; with `daemon`, it reads through the daemon's kept connections."""
    network = replica_network(config)
    if network is None or config.replica is None:
        return None
    check_prefer(config)
    source = DaemonSource(daemon) if daemon is not None else None
    keeper = ReplicaKeeper(config, network, config.daemon.interval, source,
                           daemon.metrics if daemon is not None else None)
    keeper.start()
    LOG.info("replica VIP %s: placed on one healthy standby (max lag %d bytes)",
             config.replica.vip.cidr, config.replica.max_lag_bytes)
    return keeper


def release_here(config: Config) -> bool:
    """Gives the replica VIP up on this node (promote: before taking the primary VIP)."""
    network = replica_network(config)
    if network is None:
        return False
    released = claim.release(network)
    if released:
        LOG.info("replica VIP %s released before taking the primary VIP",
                 config.replica.vip.cidr if config.replica else "")
    return released


def release_unless_eligible(config: Config) -> tuple[bool, str]:
    """`release --replica --unless-eligible` (asked over SSH by a node that wants it):
    (released, message); kept only while this node holds it and is still eligible."""
    network = replica_network(config)
    if network is None:
        return False, "no [replica_vip] configured"
    if network.holds():
        try:
            keep = want(config, DirectSource(config), holds=True) is True
        except VipError:
            keep = False  # cannot tell: the asking node sees the cluster, we do not
        if keep:
            return False, (f"not released: this node is an eligible standby holding the replica "
                           f"VIP {config.replica.vip.cidr if config.replica else ''}")
    released = claim.release(network)
    return released, ("replica VIP released" if released else "replica VIP not held")
