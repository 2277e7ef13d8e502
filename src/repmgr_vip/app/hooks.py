"""repmgr's entry points: what runs when repmgr(d) starts, promotes, follows or reports events.

Each hook logs to our own file (repmgr discards or truncates hook output), holds the node's
VIP lock while it acts, and returns the exit status repmgr expects: for promote and follow
that is repmgr's own status, never the VIP step's.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from repmgr_vip.adapters import cluster, journal, repmgr
from repmgr_vip.adapters.lock import vip_lock
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.network import VipNetwork
from repmgr_vip.adapters.system import SYSTEM_CLOCK, FileState
from repmgr_vip.app import claim
from repmgr_vip.app.fencing import Fencing
from repmgr_vip.app.lease import unrenewed_warning
from repmgr_vip.app.release_retry import start_retrier
from repmgr_vip.app.replica import release_here
from repmgr_vip.config.schema import Config
from repmgr_vip.core import ports
from repmgr_vip.core.decide import CONFLICT, Action, Peer, after_fencing, legitimacy
from repmgr_vip.core.errors import ExitCode, VipError
from repmgr_vip.core.model import NodeRecord, NodeView

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


class SystemNode:
    """The real LocalNode port: local PostgreSQL, repmgr.nodes, repmgr, the retrier."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def view(self, timeout: float) -> NodeView:
        return cluster.local_view(self.config, timeout)

    def others(self, cached: bool = False) -> list[NodeRecord]:
        nodes = cluster.cached_nodes(self.config) if cached else \
            cluster.registered_nodes(self.config)
        return [n for n in nodes if n.node_id != self.config.repmgr.node_id]

    def start_promote(self) -> repmgr.RepmgrRun:
        return repmgr.start_repmgr(self.config, "standby", "promote", "--log-to-file")

    def start_retrier(self, timeline: int, nodes: Sequence[str]) -> None:
        start_retrier(self.config, timeline, nodes)

    def release_replica(self) -> None:
        with contextlib.suppress(VipError):
            release_here(self.config)

    def checkpoint(self) -> None:
        cluster.checkpoint(self.config, timeout=30.0)


@dataclass
class HookPorts:
    """What a hook acts through. `system_ports` builds the real ones; the model of the cluster
    (tests/unit/test_model.py) passes `repmgr_vip.testing` fakes and runs the same hooks."""

    address: ports.VipAddress
    files: ports.StateFiles
    node: ports.LocalNode
    clock: ports.Clock = SYSTEM_CLOCK
    fencing: dict[str, Any] = field(default_factory=dict)  # remote, fence_runner, prober

    def fence(self, config: Config, nodes: Sequence[NodeRecord]) -> Fencing:
        return Fencing(config, self.address, nodes, clock=self.clock, **self.fencing)

    def journal(self, config: Config, source: str, action: str, reason: str,
                **kw: Any) -> None:
        self.files.journal(config.repmgr.node_name, source, action, reason, **kw)


def system_ports(config: Config) -> HookPorts:
    return HookPorts(VipNetwork(config), FileState(config), SystemNode(config))


def fence_and_acquire(config: Config, hook: HookPorts, others: list[NodeRecord],
                      timeline: int, source: str) -> str:
    """Release the VIP everywhere else, prove it free, then add and announce it here."""
    fencing = hook.fence(config, others)
    try:
        report = fencing.wait()
    finally:
        fencing.close()
    LOG.info("fencing: %s", report.summary())
    decision = after_fencing(report.answered_by, "refuse", fence_ran=bool(report.fenced),
                             all_confirmed=not report.unconfirmed)
    if decision.action is not Action.ACQUIRE:
        LOG.error("not taking the VIP: %s", decision.reason)
        hook.journal(config, source, "refuse", decision.reason, alarm=decision.alarm,
                     answered_by=list(report.answered_by), unconfirmed=report.unconfirmed)
        return f"VIP not taken: {decision.reason}"
    result = claim.claim(hook.address)  # proven free by the fencing round just above
    LOG.info("VIP %s %s and announced", config.vip.cidr, result.outcome)
    hook.journal(config, source, "acquire", decision.reason, outcome="held",
                 unconfirmed=report.unconfirmed)
    hook.node.start_retrier(timeline, report.unconfirmed)
    return f"VIP {config.vip.cidr} held here"


def start_repmgrd(config: Config) -> tuple[int, str]:
    """repmgrd_service_start_command: VIP if legitimate primary, then repmgrd, always both."""
    hook = system_ports(config)
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
                vip_note = fence_and_acquire(config, hook, others, local.timeline or 0,
                                             "start-repmgrd")
            elif decision.action is Action.RELEASE:
                vip_note = "VIP released" if claim.release(hook.address) else "VIP not held"
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


def promote(config: Config, hook: HookPorts | None = None) -> int:
    """promote_command: fence, prove the VIP free, promote, and only then take the VIP.

    When every other registered node has confirmed over SSH that it released the VIP, the
    promotion starts at once and the ARP proof runs alongside it; the VIP is still added
    only after that proof, so a host outside the cluster answering for it keeps it off.
    """
    hook = hook if hook is not None else system_ports(config)
    with hook.files.lock(LOCK_TIMEOUT):
        hook.node.release_replica()
        # start releasing at once with the node list cached on disk, then correct it from
        # repmgr.nodes: a failover should not wait for the PostgreSQL driver to load
        fencing = hook.fence(config, hook.node.others(cached=True))
        try:
            try:
                fencing.expect(hook.node.others())
            except VipError as exc:
                LOG.error("promote: fencing could not run: %s; refusing to promote", exc)
                return ExitCode.REFUSED
            return _promote_fenced(config, hook, fencing)
        finally:
            fencing.close()


def _promote_fenced(config: Config, hook: HookPorts, fencing: Fencing) -> int:
    verdict = claim.promotion_verdict(fencing, config.fencing.when_vip_not_free)
    report, decision = verdict.report, verdict.decision
    LOG.info("promote: fencing: %s", report.summary())
    hook.journal(config, "promote", decision.action.value, decision.reason,
                 alarm=decision.alarm, answered_by=list(report.answered_by),
                 released=report.released, unconfirmed=report.unconfirmed, fenced=report.fenced)
    if decision.action is Action.REFUSE:
        LOG.error("promote: %s", decision.reason)
        return ExitCode.REFUSED
    run = hook.node.start_promote()
    want_vip = decision.action is Action.ACQUIRE
    outcome = _add_vip_once_promoted(config, hook, run, verdict.proof) if want_vip else None
    if outcome:  # at once, not when repmgr returns: a cut-off node may come back any moment
        _after_vip_added(config, hook, report.unconfirmed)
    status = run.finish()
    if status != 0:
        if outcome:
            LOG.error("promote: repmgr reported failure (exit %d) but PostgreSQL left "
                      "recovery: this node is primary and keeps the VIP", status)
        else:
            LOG.error("promote: repmgr standby promote failed (exit %d); VIP not taken", status)
            hook.journal(config, "promote", "promote-failed", f"repmgr exited {status}")
            return status
    if not want_vip:
        LOG.error("promote: promoted WITHOUT the VIP: %s", decision.reason)
    elif outcome is None and _add_vip(config, hook, verdict.proof):
        _after_vip_added(config, hook, report.unconfirmed)  # repmgr returned before we saw it
    if config.fencing.checkpoint_after_promote and hook.node.view(2.0).is_primary:
        _request_checkpoint(config, hook)  # after the VIP: it costs clients nothing
    return status


def _after_vip_added(config: Config, hook: HookPorts, unconfirmed: list[str]) -> None:
    local = hook.node.view(2.0)
    hook.journal(config, "promote", "acquire", "promoted; VIP added", outcome="held",
                 timeline=local.timeline, unconfirmed=unconfirmed)
    hook.node.start_retrier(local.timeline or 0, unconfirmed)


def _request_checkpoint(config: Config, hook: HookPorts) -> None:
    """pg_rewind reads the new timeline from the control file: write it now, not at the next
    scheduled checkpoint, so `repmgr node rejoin --force-rewind` works right after a failover.
    Runs after the VIP is up, so it costs clients nothing."""
    try:
        hook.node.checkpoint()
        LOG.info("promote: CHECKPOINT done (the new timeline is in the control file)")
        hook.journal(config, "promote", "checkpoint", "the new timeline is in the control file",
                 outcome="done")
    except VipError as exc:
        LOG.warning("promote: CHECKPOINT after promotion failed: %s; run it by hand before "
                    "`repmgr node rejoin --force-rewind`", exc)


def _add_vip(config: Config, hook: HookPorts, proof: claim.Proof | None) -> bool:
    """proof: still owed when every node confirmed before any probe ended (see claim)."""
    try:
        result = claim.claim(hook.address, proof=proof)
    except VipError as exc:
        LOG.error("promote: promoted, but the VIP step failed: %s", exc)
        return False
    if not result.ok:
        why = f"promoted, but the VIP answers from {', '.join(result.answered_by)}; not added"
        LOG.error("promote: %s", why)
        hook.journal(config, "promote", "refuse", why, alarm=CONFLICT,
                     answered_by=list(result.answered_by))
        return False
    LOG.info("promote: VIP %s added and announced", config.vip.cidr)
    return True


def _add_vip_once_promoted(config: Config, hook: HookPorts, run: ports.PromoteRun,
                           proof: claim.Proof | None) -> bool | None:
    """Adds the VIP the moment PostgreSQL leaves recovery, not when repmgr's polling returns.

    `repmgr standby promote` checks for the promotion once per promote_check_interval (1 s);
    clients should not wait for that. Returns None if repmgr finished before PostgreSQL was
    seen out of recovery (nothing tried), else whether the VIP was added.
    """
    while run.poll() is None:
        if hook.node.view(1.0).is_primary:
            LOG.info("promote: PostgreSQL left recovery")
            return _add_vip(config, hook, proof)
        hook.clock.sleep(PROMOTION_POLL)
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


def fence_self(config: Config, hook: HookPorts | None = None) -> str:
    """child_nodes_disconnect_command: a primary that lost its standbys gives the VIP up.

    The marker file tells the daemon not to take it back until a majority is reachable again.
    """
    hook = hook if hook is not None else system_ports(config)
    with hook.files.lock(LOCK_TIMEOUT):
        removed = claim.release(hook.address)  # first: a full disk must not keep the VIP here
        try:
            hook.files.write_marker("child nodes disconnected")
        except OSError as exc:
            LOG.error("self-fence marker not written in %s (%s): a daemon may take the VIP "
                      "back once a majority answers", config.state_dir, exc.strerror)
    message = "self-fenced: VIP released" if removed else "self-fenced: VIP was not held"
    LOG.warning("%s (child nodes disconnected)", message)
    hook.journal(config, "fence-self", "release", "child nodes disconnected",
                 outcome="released" if removed else "not held")
    return message


@dataclass(frozen=True)
class Event:
    node_id: int
    name: str
    success: bool
    former_primary: int | None


def handle_event(config: Config, event: Event, hook: HookPorts | None = None) -> str:
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
    hook = hook if hook is not None else system_ports(config)
    with hook.files.lock(LOCK_TIMEOUT):
        if event.name in STANDBY_EVENTS:
            removed = claim.release(hook.address)
            hook.journal(config, f"event {event.name}", "release", "this node is a standby now",
                         outcome="released" if removed else "not held")
            return f"event {event.name}: " + ("VIP released" if removed else "VIP not held")
        local = hook.node.view(3.0)
        if not local.is_primary:
            return f"event {event.name}: local node is not primary ({local.error or 'standby'})"
        if hook.address.holds():
            return f"event {event.name}: VIP already held here"
        return f"event {event.name}: " + fence_and_acquire(
            config, hook, hook.node.others(), local.timeline or 0, f"event {event.name}")


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
