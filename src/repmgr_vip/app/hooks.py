"""repmgr's entry points: what runs when repmgr(d) starts, promotes, follows or reports events.

Each hook logs to our own file (repmgr discards or truncates hook output), holds the node's
VIP lock while it acts, and returns the exit status repmgr expects: for promote and follow
that is repmgr's own status, never the VIP step's.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from dataclasses import dataclass
from typing import Any

from repmgr_vip.adapters import cluster, journal, repmgr
from repmgr_vip.adapters.lock import vip_lock
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.network import VipNetwork
from repmgr_vip.adapters.statefiles import write_atomic
from repmgr_vip.app import claim
from repmgr_vip.app.fencing import Fencing, fence_others
from repmgr_vip.app.lease import unrenewed_warning
from repmgr_vip.app.release_retry import start_retrier
from repmgr_vip.app.replica import release_here
from repmgr_vip.config.schema import Config
from repmgr_vip.core.decide import CONFLICT, Action, Peer, after_fencing, legitimacy
from repmgr_vip.core.errors import ExitCode, VipError
from repmgr_vip.core.model import NodeRecord

LOCK_TIMEOUT = 60.0
PEER_QUERY_TIMEOUT = 2.0
PROMOTION_POLL = 0.05
PRIMARY_EVENTS = frozenset({"standby_promote", "standby_switchover", "repmgrd_failover_promote"})
STANDBY_EVENTS = frozenset({"node_rejoin", "standby_follow", "repmgrd_failover_follow"})
HANDLED_EVENTS = PRIMARY_EVENTS | STANDBY_EVENTS


def _other_nodes(config: Config) -> list[NodeRecord]:
    return [n for n in cluster.registered_nodes(config) if n.node_id != config.repmgr.node_id]


def _journal(config: Config, source: str, action: str, reason: str, **kw: Any) -> None:
    journal.record(config.state_dir, config.repmgr.node_name, source, action, reason, **kw)


def fence_and_acquire(config: Config, network: VipNetwork,
                      others: list[NodeRecord], timeline: int, source: str) -> str:
    """Release the VIP everywhere else, prove it free, then add and announce it here."""
    report = fence_others(config, network, others)
    LOG.info("fencing: %s", report.summary())
    decision = after_fencing(report.answered_by, "refuse", fence_ran=bool(report.fenced),
                             all_confirmed=not report.unconfirmed)
    if decision.action is not Action.ACQUIRE:
        LOG.error("not taking the VIP: %s", decision.reason)
        _journal(config, source, "refuse", decision.reason, alarm=decision.alarm,
                 answered_by=list(report.answered_by), unconfirmed=report.unconfirmed)
        return f"VIP not taken: {decision.reason}"
    result = claim.claim(network)  # proven free by the fencing round just above
    LOG.info("VIP %s %s and announced", config.vip.cidr, result.outcome)
    _journal(config, source, "acquire", decision.reason, outcome="held",
             unconfirmed=report.unconfirmed)
    start_retrier(config, timeline, report.unconfirmed)
    return f"VIP {config.vip.cidr} held here"


def start_repmgrd(config: Config) -> tuple[int, str]:
    """repmgrd_service_start_command: VIP if legitimate primary, then repmgrd, always both."""
    network = VipNetwork(config)
    vip_note = ""
    try:
        with vip_lock(config.lock_path, LOCK_TIMEOUT):
            local = cluster.local_view(config)
            others = _other_nodes(config) if local.is_primary else []
            views = cluster.query_views(others, PEER_QUERY_TIMEOUT)
            peers = [Peer(r.node_id, r.node_name, r.node_type, views[r.node_id])
                     for r in others if r.active]
            decision = legitimacy(config.repmgr.node_name, local, peers)
            LOG.info("start-repmgrd: %s: %s", decision.action.value, decision.reason)
            _journal(config, "start-repmgrd", decision.action.value, decision.reason,
                     alarm=decision.alarm)
            if decision.action is Action.ACQUIRE:
                vip_note = fence_and_acquire(config, network, others, local.timeline or 0,
                                             "start-repmgrd")
            elif decision.action is Action.RELEASE:
                vip_note = "VIP released" if claim.release(network) else "VIP not held"
            else:
                vip_note = f"VIP untouched: {decision.reason}"
    except VipError as exc:
        LOG.error("start-repmgrd: VIP step failed: %s", exc)
        vip_note = f"VIP step failed: {exc}"
    unrenewed = unrenewed_warning(config)  # vip.lease set and no daemon: say it loudly
    if unrenewed:
        LOG.error("start-repmgrd: %s", unrenewed)
        vip_note = f"{vip_note}; {unrenewed}"
    try:
        pid = repmgr.start_repmgrd(config)
    except VipError as exc:
        LOG.error("start-repmgrd: %s", exc)
        return ExitCode.FAILED, f"repmgrd not started: {exc}; {vip_note}"
    return ExitCode.OK, f"repmgrd running (pid {pid}); {vip_note}"


def stop_repmgrd(config: Config) -> tuple[int, str]:
    """repmgrd_service_stop_command: stops repmgrd and leaves the VIP alone (clients stay up)."""
    pid = repmgr.stop_repmgrd(config)
    return ExitCode.OK, f"repmgrd (pid {pid}) stopped" if pid else "repmgrd was not running"


def promote(config: Config) -> int:
    """promote_command: fence, prove the VIP free, promote, and only then take the VIP.

    When every other registered node has confirmed over SSH that it released the VIP, the
    promotion starts at once and the ARP proof runs alongside it; the VIP is still added
    only after that proof, so a host outside the cluster answering for it keeps it off.
    """
    network = VipNetwork(config)
    with vip_lock(config.lock_path, LOCK_TIMEOUT):
        with contextlib.suppress(VipError):  # the replica VIP never stays on a primary
            release_here(config)
        # start releasing at once with the node list cached on disk, then correct it from
        # repmgr.nodes: a failover should not wait for the PostgreSQL driver to load
        cached = [n for n in cluster.cached_nodes(config) if n.node_id != config.repmgr.node_id]
        fencing = Fencing(config, network, cached)
        try:
            try:
                fencing.expect(_other_nodes(config))
            except VipError as exc:
                LOG.error("promote: fencing could not run: %s; refusing to promote", exc)
                return ExitCode.REFUSED
            return _promote_fenced(config, network, fencing)
        finally:
            fencing.close()


def _promote_fenced(config: Config, network: VipNetwork, fencing: Fencing) -> int:
    verdict = claim.promotion_verdict(fencing, config.fencing.when_vip_not_free)
    report, decision = verdict.report, verdict.decision
    LOG.info("promote: fencing: %s", report.summary())
    _journal(config, "promote", decision.action.value, decision.reason, alarm=decision.alarm,
             answered_by=list(report.answered_by), released=report.released,
             unconfirmed=report.unconfirmed, fenced=report.fenced)
    if decision.action is Action.REFUSE:
        LOG.error("promote: %s", decision.reason)
        return ExitCode.REFUSED
    run = repmgr.start_repmgr(config, "standby", "promote", "--log-to-file")
    want_vip = decision.action is Action.ACQUIRE
    outcome = _add_vip_once_promoted(config, network, run, verdict.proof) if want_vip else None
    if outcome:  # at once, not when repmgr returns: a cut-off node may come back any moment
        _after_vip_added(config, report.unconfirmed)
    status = run.finish()
    if status != 0:
        if outcome:
            LOG.error("promote: repmgr reported failure (exit %d) but PostgreSQL left "
                      "recovery: this node is primary and keeps the VIP", status)
        else:
            LOG.error("promote: repmgr standby promote failed (exit %d); VIP not taken", status)
            _journal(config, "promote", "promote-failed", f"repmgr exited {status}")
            return status
    if not want_vip:
        LOG.error("promote: promoted WITHOUT the VIP: %s", decision.reason)
    elif outcome is None and _add_vip(config, network, verdict.proof):
        _after_vip_added(config, report.unconfirmed)  # repmgr returned before we saw it
    if config.fencing.checkpoint_after_promote and cluster.local_view(config, 2.0).is_primary:
        _request_checkpoint(config)  # after the VIP: it costs clients nothing
    return status


def _after_vip_added(config: Config, unconfirmed: list[str]) -> None:
    local = cluster.local_view(config, timeout=2.0)
    _journal(config, "promote", "acquire", "promoted; VIP added", outcome="held",
             timeline=local.timeline, unconfirmed=unconfirmed)
    start_retrier(config, local.timeline or 0, unconfirmed)


def _request_checkpoint(config: Config) -> None:
    """pg_rewind reads the new timeline from the control file: write it now, not at the next
    scheduled checkpoint, so `repmgr node rejoin --force-rewind` works right after a failover.
    Runs after the VIP is up, so it costs clients nothing."""
    try:
        cluster.checkpoint(config, timeout=30.0)
        LOG.info("promote: CHECKPOINT done (the new timeline is in the control file)")
        _journal(config, "promote", "checkpoint", "the new timeline is in the control file",
                 outcome="done")
    except VipError as exc:
        LOG.warning("promote: CHECKPOINT after promotion failed: %s; run it by hand before "
                    "`repmgr node rejoin --force-rewind`", exc)


def _add_vip(config: Config, network: VipNetwork, proof: claim.Proof | None) -> bool:
    """proof: still owed when every node confirmed before any probe ended (see claim)."""
    try:
        result = claim.claim(network, proof=proof)
    except VipError as exc:
        LOG.error("promote: promoted, but the VIP step failed: %s", exc)
        return False
    if not result.ok:
        why = f"promoted, but the VIP answers from {', '.join(result.answered_by)}; not added"
        LOG.error("promote: %s", why)
        _journal(config, "promote", "refuse", why, alarm=CONFLICT,
                 answered_by=list(result.answered_by))
        return False
    LOG.info("promote: VIP %s added and announced", config.vip.cidr)
    return True


def _add_vip_once_promoted(config: Config, network: VipNetwork, run: repmgr.RepmgrRun,
                           proof: claim.Proof | None) -> bool | None:
    """Adds the VIP the moment PostgreSQL leaves recovery, not when repmgr's polling returns.

    `repmgr standby promote` checks for the promotion once per promote_check_interval (1 s);
    clients should not wait for that. Returns None if repmgr finished before PostgreSQL was
    seen out of recovery (nothing tried), else whether the VIP was added.
    """
    while run.process.poll() is None:
        if cluster.local_view(config, timeout=1.0).is_primary:
            LOG.info("promote: PostgreSQL left recovery")
            return _add_vip(config, network, proof)
        time.sleep(PROMOTION_POLL)
    return None


def follow(config: Config, upstream_node_id: int) -> int:
    """follow_command: a standby never holds the VIP; release it, then follow."""
    network = VipNetwork(config)
    with vip_lock(config.lock_path, LOCK_TIMEOUT):
        try:
            if claim.release(network):
                LOG.info("follow: VIP %s released", config.vip.cidr)
                _journal(config, "follow", "release", "following a new primary",
                         outcome="released")
        except VipError as exc:
            LOG.error("follow: could not release the VIP: %s", exc)
        return repmgr.run_repmgr(config, "standby", "follow", "--log-to-file",
                                 f"--upstream-node-id={upstream_node_id}")


def fence_self(config: Config) -> str:
    """child_nodes_disconnect_command: a primary that lost its standbys gives the VIP up.

    The marker file tells the daemon not to take it back until a majority is reachable again.
    """
    from repmgr_vip.adapters.statefiles import marker_text
    from repmgr_vip.app.daemon import self_fence_marker

    network = VipNetwork(config)
    with vip_lock(config.lock_path, LOCK_TIMEOUT):
        removed = claim.release(network)  # first: a full disk must not keep the VIP here
        try:
            write_atomic(self_fence_marker(config), marker_text("child nodes disconnected"))
        except OSError as exc:
            LOG.error("self-fence marker %s not written (%s): a daemon may take the VIP back "
                      "once a majority answers", self_fence_marker(config), exc.strerror)
    message = "self-fenced: VIP released" if removed else "self-fenced: VIP was not held"
    LOG.warning("%s (child nodes disconnected)", message)
    _journal(config, "fence-self", "release", "child nodes disconnected",
             outcome="released" if removed else "not held")
    return message


@dataclass(frozen=True)
class Event:
    node_id: int
    name: str
    success: bool
    former_primary: int | None


def handle_event(config: Config, event: Event) -> str:
    """event_notification_command: switchover, rejoin and follow move the VIP too.

    It runs synchronously inside the repmgr command that fired it, so it returns quickly for
    events it does not handle and never waits for a lock held by our own hook.
    """
    if event.name not in HANDLED_EVENTS:
        return f"event {event.name}: ignored"
    if not event.success:
        return f"event {event.name}: failed event, ignored"
    if os.environ.get(repmgr.INSIDE_HOOK_ENV):
        return f"event {event.name}: handled by the running repmgr-vip hook"
    network = VipNetwork(config)
    with vip_lock(config.lock_path, LOCK_TIMEOUT):
        if event.name in STANDBY_EVENTS:
            removed = claim.release(network)
            _journal(config, f"event {event.name}", "release", "this node is a standby now",
                     outcome="released" if removed else "not held")
            return f"event {event.name}: " + ("VIP released" if removed else "VIP not held")
        local = cluster.local_view(config)
        if not local.is_primary:
            return f"event {event.name}: local node is not primary ({local.error or 'standby'})"
        if network.holds():
            return f"event {event.name}: VIP already held here"
        return f"event {event.name}: " + fence_and_acquire(
            config, network, _other_nodes(config), local.timeline or 0, f"event {event.name}")


def repmgr_conf_lines(config: Config) -> str:
    """The repmgr.conf lines that wire repmgr to this tool, with absolute, shell-quoted paths.

    repmgr runs these through a shell (system()), so each word is quoted for the shell and the
    whole value for repmgr.conf.
    """
    base = [config.remote.command, "-c", str(config.path)]

    def value(*args: str) -> str:
        command = " ".join([shlex.join(base), *args])
        return "'" + command.replace("'", "''") + "'"

    events = ",".join(sorted(HANDLED_EVENTS))
    return "\n".join([
        "# repmgr-vip: add to repmgr.conf on this node, then restart repmgrd.",
        "# event_notifications lists the events repmgr-vip acts on; keep any of your own.",
        f"promote_command={value('promote')}",
        f"follow_command={value('follow', '%n')}",
        f"repmgrd_service_start_command={value('start-repmgrd')}",
        f"repmgrd_service_stop_command={value('stop-repmgrd')}",
        f"child_nodes_disconnect_command={value('fence-self')}",
        "event_notification_command="
        + value("event", "--node-id=%n", "--event=%e", "--success=%s", "--former-primary=%p"),
        f"event_notifications='{events}'",
        "",
    ])
