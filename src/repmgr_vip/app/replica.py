"""The read-only replica VIP ([replica_vip]): one healthy standby holds it.

Eligible: a registered standby that the current primary lists as `streaming` in
pg_stat_replication (so it streams from the current primary) and whose replay is at most
`max_lag_bytes` behind the primary's current WAL position. A holder keeps it while it stays
eligible (no move for a better-ranked node: every move resets sessions); otherwise the first
eligible node by `prefer`, then by node id, takes it. Every node decides alone from what the
primary says, so two nodes can briefly both want it: an address is added only after a probe
found it free, and a node that is no longer eligible releases it within one period. With
`on_no_standby = "primary"` the primary holds it while no standby is eligible.

The daemon runs a ReplicaKeeper thread; `promote` gives the replica VIP up before it takes
the primary VIP (release_here). Both take and give it up through claim.py, the one claim
path of the primary VIP (prove free, add every address, announce).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from repmgr_vip.adapters import cluster
from repmgr_vip.adapters.lock import LockBusy, vip_lock
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.network import VipNetwork
from repmgr_vip.app import claim
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config, ReplicaSettings
from repmgr_vip.core.errors import ConfigError, VipError

QUERY_TIMEOUT = 2.0
LOCK_WAIT = 0.5
REPLICATION_QUERY = """
SELECT application_name, state, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint
  FROM pg_stat_replication
"""


@dataclass(frozen=True)
class Replication:
    """One row of the primary's pg_stat_replication."""

    name: str  # application_name: repmgr sets it to the node name
    state: str
    lag_bytes: int | None  # None: nothing replayed yet


def replica_network(config: Config) -> VipNetwork | None:
    """The VipNetwork for [replica_vip], with its own announcer file; None when not set."""
    if config.replica is None:
        return None
    own = dataclasses.replace(config, vip=config.replica.vip)
    return VipNetwork(own, announcer_file=statepaths.announcer_pid_file(config.state_dir)
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


def _rows(conninfo: str) -> list[Replication]:
    with cluster.connect(conninfo, QUERY_TIMEOUT) as conn:
        rows = conn.execute(REPLICATION_QUERY).fetchall()
    return [Replication(str(r[0]), str(r[1]), None if r[2] is None else int(r[2]))
            for r in rows]


class ReplicaKeeper(threading.Thread):
    """Places the replica VIP on this node or takes it away, once per daemon period."""

    def __init__(self, config: Config, network: VipNetwork, interval: float) -> None:
        super().__init__(daemon=True, name="replica-vip")
        assert config.replica is not None
        self.config = config
        self.settings: ReplicaSettings = config.replica
        self.network = network
        self.interval = interval
        self.stopped = threading.Event()
        self.last_note = ""

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
        """Whether to hold it; None when the cluster cannot be read (keep things as they are)."""
        me = self.config.repmgr.node_name
        local = cluster.local_view(self.config, timeout=QUERY_TIMEOUT)
        if not local.reachable:
            return False  # our PostgreSQL is down: no reads can be served here
        records = [r for r in cluster.registered_nodes(self.config, QUERY_TIMEOUT) if r.active]
        views = cluster.query_views([r for r in records if r.node_type != "witness"],
                                    QUERY_TIMEOUT)
        primaries = [r for r in records if views.get(r.node_id, local).is_primary
                     and r.node_type != "witness"]
        if len(primaries) != 1:
            return None
        primary = primaries[0]
        if local.is_primary and primary.node_name != me:
            return False
        rows = cluster.with_deadline(lambda: _rows(primary.conninfo), QUERY_TIMEOUT + 1.0,
                                     "pg_stat_replication")
        standbys = [r.node_name for r in records if r.node_type == "standby"]
        if not local.is_primary and me not in standbys:
            standbys.append(me)
        return should_hold(self.settings, me, primary.node_name, standbys, rows,
                           self.network.holds())

    def tick(self) -> None:
        want = self.want()
        if want is None:
            self._note("replica VIP: no single primary visible; leaving it as it is")
            return
        held = self.network.holds()
        if want == held:
            return
        try:
            with vip_lock(self.config.lock_path, LOCK_WAIT):
                if not want:
                    if claim.release(self.network):
                        LOG.warning("replica VIP %s released", self.settings.vip.cidr)
                    return
                result = claim.claim(self.network, proof=claim.arp_proof(self.network))
                if not result.ok:
                    self._note(f"replica VIP {self.settings.vip.cidr} still answers from "
                               f"{', '.join(result.answered_by)}; waiting for its release")
                    return
                LOG.warning("replica VIP %s added", self.settings.vip.cidr)
        except LockBusy:
            return


def check_prefer(config: Config) -> None:
    """replica_vip.prefer must name registered nodes (exit 2); unknown when PostgreSQL is
    down, then the keeper simply ranks unknown names last."""
    if config.replica is None or not config.replica.prefer:
        return
    try:
        names = {r.node_name for r in cluster.registered_nodes(config, QUERY_TIMEOUT)}
    except VipError:
        return
    unknown = [name for name in config.replica.prefer if name not in names]
    if unknown:
        raise ConfigError(f"replica_vip.prefer names {unknown[0]!r}, which is not a "
                          "registered node; use node names from `repmgr cluster show`")


def start_replica_keeper(config: Config) -> ReplicaKeeper | None:
    network = replica_network(config)
    if network is None or config.replica is None:
        return None
    check_prefer(config)
    keeper = ReplicaKeeper(config, network, config.daemon.interval)
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
