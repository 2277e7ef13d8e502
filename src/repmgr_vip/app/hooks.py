"""repmgr's entry points: what runs when repmgr(d) starts, promotes, follows or reports events.

Each hook logs to our own file (repmgr discards or truncates hook output) and returns the exit
status repmgr expects: for promote and follow that is repmgr's own status, never the VIP step's.

Fast path: when this node's daemon runs, a hook hands its VIP step to it over the control
socket (adapters/control.py) and the daemon runs the very same step below with its warm
adapters (PostgreSQL driver loaded, SSH masters up, CAP_NET_RAW for ARP, no sudo). When no
daemon greets within control.CONNECT_BOUND (200 ms), or it does not reply within the step's
own deadline, the hook does the step itself, as it always did. Whoever acts holds the node's
VIP lock around the step, so a late daemon and the hook never act at once; every step is
idempotent, so doing it twice changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from repmgr_vip.adapters import control, journal
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.procstart import process_start_time
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config
from repmgr_vip.core.errors import CommandFailed, ExitCode, VipError

# The fallback path's modules are imported where they are used: a hook that hands its step
# to the daemon never loads the PostgreSQL driver, fencing or the network adapter.
if TYPE_CHECKING:
    from concurrent.futures import Future

    from repmgr_vip.adapters.repmgr import RepmgrRun
    from repmgr_vip.app.claim import PromotionVerdict, Proof
    from repmgr_vip.app.fencing import Fencing
    from repmgr_vip.core.model import NodeRecord, NodeView
    from repmgr_vip.core.ports import Clock, LocalNode, PromoteRun, StateFiles, VipAddress

LOCK_TIMEOUT = 60.0
PEER_QUERY_TIMEOUT = 2.0
PROMOTE_ARGS = ("standby", "promote", "--log-to-file")
DAEMON_SKIPPED: str | None = None  # cli/quick.py already asked the daemon and gave up: why
TAKE_BACK_ASKS = 3  # a failed promotion: how often PostgreSQL is asked before the VIP goes
PROMOTION_POLL = 0.05
PROMOTION_WATCH = 90.0  # the daemon watches for PostgreSQL leaving recovery at most this long
HOOK_GONE_WATCH = 10.0  # ... but only this long once the hook is gone (killed)
AFTER_PROMOTE_WAIT = 60.0  # the daemon's VIP step once repmgr returned (a proof, an add)
PRIMARY_EVENTS = frozenset({"standby_promote", "standby_switchover", "repmgrd_failover_promote"})
STANDBY_EVENTS = frozenset({"node_rejoin", "standby_follow", "repmgrd_failover_follow"})
HANDLED_EVENTS = PRIMARY_EVENTS | STANDBY_EVENTS


@dataclass
class Hands:
    """What a VIP step acts with: the hook's own fresh adapters, or the daemon's warm ones."""

    network: VipAddress
    lock: Callable[[float], AbstractContextManager[None]]  # the node's VIP lock (LockBusy)
    via: str = "hook"  # who acts: "hook" or "daemon" (journaled with every entry)
    fencing: Mapping[str, Any] = field(default_factory=dict)  # Fencing's ports (remote, ...)
    daemon: str = ""  # hook only: why the daemon did not do it ("not running", ...)
    # the rest of the host; None: the real one (the model passes repmgr_vip.testing fakes)
    node: LocalNode | None = None  # local PostgreSQL, repmgr.nodes, repmgr, the retrier
    files: StateFiles | None = None  # the journal and the fence-self marker
    clock: Clock | None = None

    def local(self, config: Config) -> LocalNode:
        return self.node if self.node is not None else SystemNode(config)

    def sleep(self, seconds: float) -> None:
        (self.clock.sleep if self.clock is not None else time.sleep)(seconds)


class SystemNode:
    """The real LocalNode port: local PostgreSQL, repmgr.nodes, repmgr, the retrier."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def view(self, timeout: float) -> NodeView:
        from repmgr_vip.adapters import cluster

        return cluster.local_view(self.config, timeout)

    def others(self, cached: bool = False) -> list[NodeRecord]:
        from repmgr_vip.adapters import cluster

        if not cached:
            return _other_nodes(self.config)
        me = self.config.repmgr.node_id
        return [n for n in cluster.cached_nodes(self.config) if n.node_id != me]

    def others_soon(self) -> Future[list[NodeRecord]]:
        """The fresh list, read in a thread of its own (see Fencing.expect_soon)."""
        from concurrent.futures import Future

        future: Future[list[NodeRecord]] = Future()

        def read() -> None:
            try:
                future.set_result(self.others())
            except BaseException as exc:  # the round raises it (VipError: refused)
                future.set_exception(exc)

        threading.Thread(target=read, daemon=True, name="node-list").start()
        return future

    def start_promote(self) -> RepmgrRun:
        from repmgr_vip.adapters import repmgr

        return repmgr.start_repmgr(self.config, *PROMOTE_ARGS)

    def start_retrier(self, timeline: int, nodes: Sequence[str]) -> None:
        from repmgr_vip.app.release_retry import start_retrier

        start_retrier(self.config, timeline, nodes)

    def release_replica(self) -> None:
        from repmgr_vip.app.replica import release_here

        with contextlib.suppress(VipError):
            release_here(self.config)

    def checkpoint(self) -> None:
        from repmgr_vip.adapters import cluster

        cluster.checkpoint(self.config, timeout=30.0)


def local_hands(config: Config, daemon: str = "") -> Hands:
    """The hook's own adapters: `ip`/`arping` through sudo, a fresh flock, fresh ssh."""
    from repmgr_vip.adapters.lock import vip_lock
    from repmgr_vip.adapters.network import VipNetwork
    from repmgr_vip.app.fencing import hook_round

    # the LAN proof as the daemon has it (daemon.lan_proof): through sudo, a root helper whose
    # complete proofs let the round ask the old primary first (Fencing.late_prior)
    network = VipNetwork(config, lan_proof=config.daemon.lan_proof)
    fencing = hook_round(network.complete_proofs)
    return Hands(network, lambda timeout: vip_lock(config.lock_path, timeout), "hook",
                 fencing=fencing, daemon=daemon)


def _own(config: Config, own: Hands | None, why: str) -> Hands:
    """The hands a hook acts with itself, noting why the daemon did not act."""
    if own is None:
        return local_hands(config, why)
    own.daemon = why
    return own


def _other_nodes(config: Config) -> list[NodeRecord]:
    from repmgr_vip.adapters import cluster

    return [n for n in cluster.registered_nodes(config) if n.node_id != config.repmgr.node_id]


def _keep_node_list(config: Config, hands: Hands) -> None:
    """Reads repmgr.nodes so that it is on disk (cluster.cached_nodes) when this standby's
    promote_command runs: its fencing then asks the old primary at once, instead of after
    the PostgreSQL driver loaded and the query returned (70 ms of client outage here); and
    with it the ssh command line of that first release, which the hook's quick start sends
    before the full CLI has even loaded (fencing.keep_first_releases), when the round uses
    the real ssh."""
    with contextlib.suppress(VipError, OSError):
        others = hands.local(config).others()
        if "remote" not in hands.fencing:
            from repmgr_vip.app.fencing import keep_first_releases

            keep_first_releases(config, others)


def _journal(config: Config, hands: Hands, source: str, action: str, reason: str,
             **kw: Any) -> None:
    who: dict[str, str] = {"via": hands.via}
    if hands.daemon:
        who["daemon"] = hands.daemon
    if hands.files is not None:
        hands.files.journal(config.repmgr.node_name, source, action, reason, **kw, **who)
        return
    journal.record(config.state_dir, config.repmgr.node_name, source, action, reason, **kw,
                   **who)


# --- asking the daemon ---------------------------------------------------------------------


def _request_id() -> str:
    return f"{os.getpid()}-{os.urandom(6).hex()}"


def step_wait(config: Config, *, fencing: bool) -> float:
    """How long a hook waits for the daemon's reply once greeted: the lock, then the step's
    own bound (a fencing round ends within ssh_command_timeout, fence_command's timeout and
    the lease), and a margin. Only a daemon that hangs after its greeting costs this."""
    if not fencing:
        return LOCK_TIMEOUT + 15.0
    from repmgr_vip.app.fencing import holder_wait

    f = config.fencing
    return LOCK_TIMEOUT + f.ssh_command_timeout + f.fence_timeout + holder_wait(config) + 30.0


def ask_daemon(config: Config, op: str, timeout: float,
               **args: Any) -> tuple[dict[str, Any] | None, str]:
    """The daemon's reply to a one-exchange step, or (None, why it did not do it)."""
    try:
        with control.connect(statepaths.control_socket(config.state_dir)) as conv:
            reply = conv.ask({"op": op, "id": _request_id(), **args}, timeout)
    except control.Unavailable as exc:
        return None, _fallback_note(op, exc.reason)
    if not reply.get("ok"):
        return None, _fallback_note(op, f"failed: {reply.get('error', '?')}")
    _raise_if_failed(reply)
    return reply, ""


def _fallback_note(op: str, reason: str) -> str:
    """Logs why the hook acts itself (quietly for a hooks-only install); returns the why."""
    log = LOG.info if reason == "not running" else LOG.warning
    log("%s: daemon %s; doing the VIP step here", op, reason)
    return reason


def _raise_if_failed(reply: Mapping[str, Any]) -> None:
    """The daemon's step raised what the hook's own would have: the same error, same code."""
    if "raise" in reply:
        error = CommandFailed(str(reply["raise"]))
        code = reply.get("code")
        codes = {int(c) for c in ExitCode}
        error.exit_code = ExitCode(code) if code in codes else ExitCode.FAILED
        raise error


def serve(config: Config, hands: Hands, request: Mapping[str, Any],
          conv: control.Conversation) -> None:
    """The daemon's side: runs the step a hook asked for, with the daemon's hands."""
    op = request.get("op")
    try:
        if op == "promote":
            _serve_promote(config, hands, conv, quick=bool(request.get("quick")))
            return
        if op == "start-repmgrd":
            message = start_repmgrd_vip_step(config, hands)
        elif op == "follow":
            with hands.lock(LOCK_TIMEOUT):
                _release_for_follow(config, hands)
            message = "released for follow"
        elif op == "fence-self":
            message = fence_self_step(config, hands)
        elif op == "event":
            message = event_step(config, hands, Event.from_request(request))
        elif op == "release":  # a peer, over its warm link (peer_release.py)
            from repmgr_vip.app.peer_release import serve_release

            serve_release(config, hands, request, conv.send)
            return
        else:
            conv.send({"ok": False, "error": f"unknown op {op!r}"})
            return
    except VipError as exc:
        conv.send({"ok": True, "raise": str(exc), "code": int(exc.exit_code)})
        return
    conv.send({"ok": True, "message": message})


# --- start-repmgrd -------------------------------------------------------------------------


def fence_and_acquire(config: Config, hands: Hands, others: list[NodeRecord], timeline: int,
                      source: str) -> str:
    """Release the VIP everywhere else, prove it free, then add and announce it here."""
    from repmgr_vip.app import claim
    from repmgr_vip.app.fencing import fence_others
    from repmgr_vip.core.decide import Action, after_fencing

    report = fence_others(config, hands.network, others, **hands.fencing)
    LOG.info("fencing: %s", report.summary())
    decision = after_fencing(report.answered_by, "refuse", fence_ran=bool(report.fenced),
                             all_confirmed=not report.unconfirmed)
    if decision.action is not Action.ACQUIRE:
        LOG.error("not taking the VIP: %s", decision.reason)
        _journal(config, hands, source, "refuse", decision.reason, alarm=decision.alarm,
                 answered_by=list(report.answered_by), unconfirmed=report.unconfirmed)
        return f"VIP not taken: {decision.reason}"
    result = claim.claim(hands.network)  # proven free by the fencing round just above
    LOG.info("VIP %s %s and announced", config.vip.cidr, result.outcome)
    _journal(config, hands, source, "acquire", decision.reason, outcome="held",
             unconfirmed=report.unconfirmed)
    hands.local(config).start_retrier(timeline, report.unconfirmed)
    return f"VIP {config.vip.cidr} held here"


def start_repmgrd_vip_step(config: Config, hands: Hands) -> str:
    """VIP if this node is the legitimate primary, released if it must not hold it."""
    from repmgr_vip.adapters import cluster
    from repmgr_vip.app import claim
    from repmgr_vip.core.decide import Action, Peer, legitimacy

    try:
        with hands.lock(LOCK_TIMEOUT):
            local = cluster.local_view(config)
            others = _other_nodes(config) if local.is_primary else []
            views = cluster.query_views(others, PEER_QUERY_TIMEOUT)
            peers = [Peer(r.node_id, r.node_name, r.node_type, views[r.node_id])
                     for r in others if r.active]
            decision = legitimacy(config.repmgr.node_name, local, peers)
            LOG.info("start-repmgrd: %s: %s", decision.action.value, decision.reason)
            _journal(config, hands, "start-repmgrd", decision.action.value, decision.reason,
                     alarm=decision.alarm)
            if decision.action is Action.ACQUIRE:
                return fence_and_acquire(config, hands, others, local.timeline or 0,
                                         "start-repmgrd")
            if decision.action is Action.RELEASE:
                released = claim.release(hands.network)
                _keep_node_list(config, hands)
                return "VIP released" if released else "VIP not held"
            return f"VIP untouched: {decision.reason}"
    except VipError as exc:
        LOG.error("start-repmgrd: VIP step failed: %s", exc)
        return f"VIP step failed: {exc}"


def start_repmgrd(config: Config, *, own: Hands | None = None) -> tuple[int, str]:
    """repmgrd_service_start_command: VIP if legitimate primary, then repmgrd, always both.

    `own`: what to act with when the daemon does not (tests pass fakes; default: this host)."""
    from repmgr_vip.adapters import repmgr

    reply, why = ask_daemon(config, "start-repmgrd", step_wait(config, fencing=True))
    if reply is not None:
        vip_note = str(reply.get("message", ""))
    else:
        from repmgr_vip.app.lease import unrenewed_warning

        vip_note = start_repmgrd_vip_step(config, _own(config, own, why))
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
    from repmgr_vip.adapters import repmgr

    pid = repmgr.stop_repmgrd(config)
    return ExitCode.OK, f"repmgrd (pid {pid}) stopped" if pid else "repmgrd was not running"


# --- promote -------------------------------------------------------------------------------


class Promotion:
    """promote's VIP side, the same code whether the hook or the daemon runs it.

    The caller holds the VIP lock throughout: fence() proves the VIP free (or refuses),
    watch() adds it the moment PostgreSQL leaves recovery, finish() settles it once repmgr
    returned. close() ends the fencing round (its ARP prober) in every case.
    """

    def __init__(self, config: Config, hands: Hands, lock_waited: float = 0.0) -> None:
        self.config = config
        self.hands = hands
        self.lock_waited = lock_waited  # for the journal: time spent waiting for the lock
        self.fencing: Fencing | None = None
        self.verdict: PromotionVerdict | None = None
        self.want_vip = False
        self.outcome: bool | None = None  # None: nothing tried yet; else whether it was added
        self.settled = False  # journaled as held and the release retrier started
        self.added_at: float | None = None  # wall clock: when the VIP went up (the journal's
        # held entry follows the settle wait, up to SETTLE_WAIT later)
        self.created = time.monotonic()
        self.timings: dict[str, int] = {}  # ms, for the journal: where a promotion's time went
        # (action, reason, fields) of the fencing verdict, until after_verdict journals it
        self.verdict_entry: tuple[str, str, dict[str, Any]] | None = None

    def fence(self) -> int | None:
        """Releases the VIP everywhere else and judges; None: promote now, else exit code.

        When every other registered node has confirmed over SSH that it released the VIP,
        the promotion starts at once and the ARP proof runs alongside it; the VIP is still
        added only after that proof, so a host outside the cluster answering keeps it off.
        """
        from repmgr_vip.app import claim
        from repmgr_vip.app.fencing import Fencing
        from repmgr_vip.core.decide import Action

        config, node = self.config, self.hands.local(self.config)
        node.release_replica()  # the replica VIP never stays on a primary
        # start releasing at once with the node list cached on disk, then correct it from
        # repmgr.nodes, read meanwhile: a failover should not wait for the PostgreSQL driver
        # to load, nor for the query
        cached = node.others(cached=True)
        fresh = node.others_soon()
        self.timings["prepare_ms"] = round((time.monotonic() - self.created) * 1000)
        self.fencing = Fencing(config, self.hands.network, cached, **self.hands.fencing)
        self.fencing.expect_soon(fresh)
        try:
            verdict = claim.promotion_verdict(self.fencing, config.fencing.when_vip_not_free)
        except VipError as exc:
            LOG.error("promote: fencing could not run: %s; refusing to promote", exc)
            return ExitCode.REFUSED
        report, decision = verdict.report, verdict.decision
        LOG.info("promote: fencing: %s", report.summary())
        self.verdict_entry = (decision.action.value, decision.reason, {
            "alarm": decision.alarm, "answered_by": list(report.answered_by),
            "released": list(report.released), "unconfirmed": report.unconfirmed,
            "fenced": list(report.fenced), "fencing_ms": round(report.seconds * 1000),
            "cached": len(cached),  # nodes asked before repmgr.nodes was read (_keep_node_list)
            "early": self.fencing.early,  # ... and before this CLI had loaded (cli/quick.py)
            "lock_ms": round(self.lock_waited * 1000), **self.timings})
        if decision.action is Action.REFUSE:
            self.after_verdict()
            LOG.error("promote: %s", decision.reason)
            return ExitCode.REFUSED
        self.verdict = verdict
        self.want_vip = decision.action is Action.ACQUIRE
        return None

    def after_verdict(self, ask_rest: bool = True) -> None:
        """Once the VIP went up and the verdict reached the hook: asks the nodes the round
        did not need (Fencing.ask_rest) and journals the verdict, once, so that neither sits
        between the old holder's release and the add, when no node answers for the VIP.
        ask_rest=False: the hook asks them once PostgreSQL left recovery (_after_vip_added),
        so that their fresh ssh sessions do not compete with the promotion for the CPU."""
        if self.fencing is not None and ask_rest:
            self.fencing.ask_rest()
        entry, self.verdict_entry = self.verdict_entry, None
        if entry is not None:
            action, reason, fields = entry
            _journal(self.config, self.hands, "promote", action, reason, **fields)

    @property
    def unconfirmed(self) -> list[str]:
        return self.verdict.report.unconfirmed if self.verdict else []

    def before_promote(self) -> None:
        """Adds the VIP now when the fencing round proved it free already: the old holder let
        it go a moment ago, so clients find it again at once (a standby refuses their writes
        until the promotion ends) instead of losing SYNs into silence, each of which costs a
        full TCP retransmission. No write can reach the old primary: it released first."""
        if self.want_vip and self.verdict is not None and self.verdict.proof is None:
            started = time.monotonic()
            self.outcome = self.add_vip(None)
            self.timings["add_ms"] = round((time.monotonic() - started) * 1000)

    def watch(self, running: Callable[[], bool]) -> None:
        """While repmgr runs: adds the VIP once the owed proof passes (if before_promote could
        not), then settles it the moment PostgreSQL leaves recovery, not when repmgr's polling
        returns (`repmgr standby promote` checks once per promote_check_interval, 1 s).
        `running`: repmgr has not returned yet."""
        if not self.want_vip:
            return
        if self.outcome is None:
            self.outcome = self.add_vip(self.verdict.proof if self.verdict else None)
        if not self.outcome:
            return
        while running():
            if self.hands.local(self.config).view(1.0).is_primary:
                LOG.info("promote: PostgreSQL left recovery")
                self._after_vip_added()  # at once: a cut-off node may come back any moment
                return
            self.hands.sleep(PROMOTION_POLL)

    def finish(self, status: int) -> int:
        """Once repmgr returned with `status`: the VIP settled, or taken back from a node that
        stayed a standby; the status."""
        config = self.config
        if status != 0:
            if self.outcome and not self._primary_after_all():
                self._take_back(status)
                return status
            if self.outcome:
                LOG.error("promote: repmgr reported failure (exit %d) but PostgreSQL left "
                          "recovery: this node is primary and keeps the VIP", status)
            else:
                LOG.error("promote: repmgr standby promote failed (exit %d); VIP not taken",
                          status)
                _journal(config, self.hands, "promote", "promote-failed",
                         f"repmgr exited {status}")
                return status
        if not self.want_vip:
            reason = self.verdict.decision.reason if self.verdict else "?"
            LOG.error("promote: promoted WITHOUT the VIP: %s", reason)
        elif self.outcome is None:  # repmgr returned before the owed proof was asked for
            self.outcome = self.add_vip(self.verdict.proof if self.verdict else None)
        if self.outcome:
            self._after_vip_added()
        return status

    def _primary_after_all(self) -> bool:
        """Whether PostgreSQL left recovery although repmgr failed; a query that times out
        is asked again, so a slow new primary does not lose the VIP to one late answer."""
        standby = 0
        for _ in range(TAKE_BACK_ASKS):
            view = self.hands.local(self.config).view(2.0)
            if view.reachable and view.is_primary:
                return True
            standby += 1 if view.reachable else 0
            if standby >= 2:  # twice in a row: not an answer that predates the promotion
                return False
        return False

    def _take_back(self, status: int) -> None:
        """The VIP went up for a promotion that failed: a standby must not keep it."""
        from repmgr_vip.app import claim

        try:
            claim.release(self.hands.network)
        except VipError as exc:
            LOG.error("promote: repmgr failed (exit %d) and removing the VIP failed too: %s",
                      status, exc)
            return
        self.outcome = False
        LOG.error("promote: repmgr standby promote failed (exit %d) and PostgreSQL is still "
                  "in recovery; the VIP added for it is removed", status)
        _journal(self.config, self.hands, "promote", "promote-failed",
                 f"repmgr exited {status}; the VIP added before it is removed",
                 outcome="released")

    def checkpoint(self) -> None:
        """pg_rewind reads the new timeline from the control file: write it now, not at the
        next scheduled checkpoint, so `repmgr node rejoin --force-rewind` works right after
        a failover. Runs after the VIP is up, so it costs clients nothing."""
        config, node = self.config, self.hands.local(self.config)
        if not (config.fencing.checkpoint_after_promote and node.view(2.0).is_primary):
            return
        try:
            node.checkpoint()
            LOG.info("promote: CHECKPOINT done (the new timeline is in the control file)")
            _journal(config, self.hands, "promote", "checkpoint",
                     "the new timeline is in the control file", outcome="done")
        except VipError as exc:
            LOG.warning("promote: CHECKPOINT after promotion failed: %s; run it by hand "
                        "before `repmgr node rejoin --force-rewind`", exc)

    def close(self) -> None:
        self.after_verdict()
        if self.fencing is not None:
            self.fencing.close()

    def add_vip(self, proof: Proof | None) -> bool:
        """proof: still owed when every node confirmed before any probe ended (see claim)."""
        from repmgr_vip.app import claim
        from repmgr_vip.core.decide import CONFLICT

        config = self.config
        try:
            result = claim.claim(self.hands.network, proof=proof)
        except VipError as exc:
            LOG.error("promote: promoted, but the VIP step failed: %s", exc)
            return False
        if not result.ok:
            why = f"promoted, but the VIP answers from {', '.join(result.answered_by)}; not added"
            LOG.error("promote: %s", why)
            _journal(config, self.hands, "promote", "refuse", why, alarm=CONFLICT,
                     answered_by=list(result.answered_by))
            return False
        self.added_at = time.time()
        LOG.info("promote: VIP %s added and announced", config.vip.cidr)
        return True

    def _after_vip_added(self) -> None:
        if self.settled:
            return
        self.settled = True
        if self.fencing is not None:
            from repmgr_vip.app.fencing import SETTLE_WAIT

            # the releases confirmed after the round ended on the holder's
            self.fencing.ask_rest()
            self.fencing.settle(wait=SETTLE_WAIT)
        node = self.hands.local(self.config)
        local = node.view(2.0)
        added = {"added_at": round(self.added_at, 4)} if self.added_at is not None else {}
        _journal(self.config, self.hands, "promote", "acquire", "promoted; VIP added",
                 outcome="held", timeline=local.timeline, unconfirmed=self.unconfirmed,
                 **added, **self.timings)
        node.start_retrier(local.timeline or 0, self.unconfirmed)


def promote(config: Config, *, own: Hands | None = None) -> int:
    """promote_command: fence, prove the VIP free, promote, and only then take the VIP.

    With a daemon, the daemon fences and adds the VIP while this hook runs repmgr; without
    one (or one that does not answer in time) the hook does it all, as before.
    """
    started = process_start_time()
    status, why = _promote_via_daemon(config, started)
    if status is not None:
        return status
    hands = _own(config, own, why)
    with _locked_promotion(config, hands) as promotion:
        refused = promotion.fence()
        if refused is not None:
            return refused
        promotion.before_promote()
        run = _start_promote(config, started, hands.via, hands.daemon, node=hands.node)
        promotion.after_verdict(ask_rest=False)  # asked once PostgreSQL left recovery
        promotion.watch(lambda: run.poll() is None)
        status = promotion.finish(run.finish())
        promotion.checkpoint()
        return status


@contextlib.contextmanager
def _locked_promotion(config: Config, hands: Hands) -> Iterator[Promotion]:
    """A promotion under the node's VIP lock, hook or daemon alike; its lock wait is journaled
    with the fencing verdict, and its watchers end whatever happens."""
    asked = time.monotonic()
    with hands.lock(LOCK_TIMEOUT):
        promotion = Promotion(config, hands, lock_waited=time.monotonic() - asked)
        try:
            yield promotion
        finally:
            promotion.close()


def _start_promote(config: Config, started: float | None, via: str, daemon: str = "",
                   node: LocalNode | None = None, **steps: float) -> PromoteRun:
    """Starts `repmgr standby promote`; journals how long this hook took to get here
    (`via`: who fenced, the hook or the daemon)."""
    run = (node if node is not None else SystemNode(config)).start_promote()
    now = time.time()
    hook_ms = round((now - started) * 1000) if started is not None else None
    LOG.info("promote: repmgr standby promote started %s ms after this hook started "
             "(fenced by the %s)", hook_ms, via)
    extra: dict[str, Any] = {"daemon": daemon} if daemon else {}
    if started is not None:  # the daemon path's milestones: asked it, got its verdict
        extra.update({f"{name}_ms": round((at - started) * 1000) for name, at in steps.items()})
    journal.record(config.state_dir, config.repmgr.node_name, "promote", "repmgr-promote",
                   "repmgr standby promote started", via=via, process_start=started,
                   repmgr_started=round(now, 4), hook_ms=hook_ms, **extra)
    return run


def _promote_via_daemon(config: Config, started: float | None) -> tuple[int | None, str]:
    """(repmgr's status, "") when the daemon fenced; (None, why) when the hook must do it all.

    The conversation: {"op": "promote"} -> the verdict; the hook runs repmgr while the daemon
    adds the VIP once PostgreSQL leaves recovery; {"op": "promoted", "status"} -> done.
    """
    if DAEMON_SKIPPED is not None:
        return None, _fallback_note("promote", DAEMON_SKIPPED)
    asked = time.time()
    try:
        conv = control.connect(statepaths.control_socket(config.state_dir))
    except control.Unavailable as exc:
        return None, _fallback_note("promote", exc.reason)
    with conv:
        if not conv.send({"op": "promote", "id": _request_id()}):
            return None, _fallback_note("promote", "closed the connection")
        from repmgr_vip.adapters import repmgr  # noqa: F401 - loads while the daemon fences

        wait = step_wait(config, fencing=True)
        verdict = conv.receive(wait)
        if verdict is None:
            why = "closed the connection" if conv.closed else f"gave no reply within {wait:g} s"
            return None, _fallback_note("promote", why)
        if not verdict.get("ok"):
            return None, _fallback_note("promote", f"failed: {verdict.get('error', '?')}")
        _raise_if_failed(verdict)
        if "exit" in verdict:  # refused; the daemon journaled why
            return _int(verdict["exit"], ExitCode.REFUSED), ""
        run = _start_promote(config, started, "daemon", asked=asked, verdict=time.time())
        status = run.finish()
        try:
            conv.ask({"op": "promoted", "status": status}, AFTER_PROMOTE_WAIT)
        except control.Unavailable as exc:
            LOG.error("promote: daemon %s after its verdict; taking the VIP step here",
                      exc.reason)
            if verdict.get("want_vip"):
                vip_after_lost_daemon(config, status, list(verdict.get("unconfirmed", [])))
    return status, ""


def vip_after_lost_daemon(config: Config, status: int, unconfirmed: list[str]) -> None:
    """The daemon fenced, then vanished before the VIP was settled: add it here, after a
    fresh ARP proof, if PostgreSQL is out of recovery."""
    from repmgr_vip.adapters import cluster
    from repmgr_vip.app import claim

    hands = local_hands(config, "lost after its verdict")
    with hands.lock(LOCK_TIMEOUT):
        if not cluster.local_view(config, timeout=2.0).is_primary:
            LOG.error("promote: not primary (repmgr exited %d); VIP not taken", status)
            return
        promotion = Promotion(config, hands)
        if promotion.add_vip(claim.arp_proof(hands.network)):
            _journal(config, hands, "promote", "acquire", "promoted; VIP added",
                     outcome="held", unconfirmed=unconfirmed)


def _serve_promote(config: Config, hands: Hands, conv: control.Conversation, *,
                   quick: bool = False) -> None:
    """The daemon's side of promote: fence, hand the verdict over, and while the hook runs
    repmgr, add the VIP the moment PostgreSQL leaves recovery; all under the lock.

    quick: the hook is cli/quick.py, which reads no configuration: the verdict carries the
    repmgr command line, and the hook reports when it started it and what repmgr printed."""
    with _locked_promotion(config, hands) as promotion:
        refused = promotion.fence()
        if refused is not None:
            conv.send({"ok": True, "exit": int(refused)})
            return
        promotion.before_promote()
        verdict: dict[str, Any] = {"ok": True, "want_vip": promotion.want_vip,
                                   "unconfirmed": promotion.unconfirmed}
        if quick:
            from repmgr_vip.adapters import repmgr

            verdict["argv"] = repmgr.repmgr_argv(config, *PROMOTE_ARGS)
            verdict["env"] = {repmgr.INSIDE_HOOK_ENV: "1"}
        sent = conv.send(verdict)
        promotion.after_verdict()
        if not sent:
            LOG.warning("promote: the hook stopped waiting before the verdict; "
                        "it fences and promotes by itself")
            return
        status: int | None = None
        deadline = time.monotonic() + PROMOTION_WATCH

        def running() -> bool:
            nonlocal status, deadline
            message = conv.receive(0.0)
            if message is not None and message.get("op") == "started":
                _journal_quick_start(config, message)
            if message is not None and message.get("op") == "promoted":
                status = _int(message.get("status"), 1)
                _log_repmgr_output(message.get("output"))
            if conv.closed:  # the hook was killed: its repmgr may still be promoting
                deadline = min(deadline, time.monotonic() + HOOK_GONE_WATCH)
            return status is None and time.monotonic() < deadline

        promotion.watch(running)
        while status is None and not conv.closed and time.monotonic() < deadline:
            running()
            time.sleep(PROMOTION_POLL)
        if status is None:  # the hook is gone: judge by what PostgreSQL says
            from repmgr_vip.adapters import cluster

            status = 0 if cluster.local_view(config, timeout=2.0).is_primary else 1
        promotion.finish(status)
        conv.send({"ok": True, "vip": bool(promotion.outcome)})
        promotion.checkpoint()  # after the reply: the hook does not wait for it


def _journal_quick_start(config: Config, message: Mapping[str, Any]) -> None:
    """cli/quick.py started repmgr: the journal entry `_start_promote` writes for a hook."""
    def wall(key: str) -> float | None:
        value = message.get(key)
        return float(value) if isinstance(value, int | float) else None

    started, at = wall("process_start"), wall("at")
    hook_ms = round((at - started) * 1000) if started is not None and at is not None else None
    extra: dict[str, Any] = {
        f"{key}_ms": round((value - started) * 1000) for key in ("asked", "verdict")
        if started is not None and (value := wall(key)) is not None}
    LOG.info("promote: repmgr standby promote started %s ms after the quick hook started "
             "(fenced by the daemon)", hook_ms)
    journal.record(config.state_dir, config.repmgr.node_name, "promote", "repmgr-promote",
                   "repmgr standby promote started", via="daemon", quick=True,
                   process_start=started, repmgr_started=at, hook_ms=hook_ms, **extra)


def _log_repmgr_output(output: Any) -> None:
    if isinstance(output, str):
        for line in output.splitlines():
            if line.strip():
                LOG.info("repmgr: %s", line.rstrip())


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default



# --- follow, fence-self, events ------------------------------------------------------------


def _release_for_follow(config: Config, hands: Hands) -> None:
    from repmgr_vip.app import claim

    try:
        if claim.release(hands.network):
            LOG.info("follow: VIP %s released", config.vip.cidr)
            _journal(config, hands, "follow", "release", "following a new primary",
                     outcome="released")
    except VipError as exc:
        LOG.error("follow: could not release the VIP: %s", exc)


def follow(config: Config, upstream_node_id: int, *, own: Hands | None = None) -> int:
    """follow_command: a standby never holds the VIP; release it, then follow."""
    from repmgr_vip.adapters import repmgr

    argv = ("standby", "follow", "--log-to-file", f"--upstream-node-id={upstream_node_id}")
    reply, why = ask_daemon(config, "follow", step_wait(config, fencing=False))
    if reply is not None:  # released by the daemon, under its lock
        return repmgr.run_repmgr(config, *argv)
    hands = _own(config, own, why)
    with hands.lock(LOCK_TIMEOUT):
        _release_for_follow(config, hands)
        status = repmgr.run_repmgr(config, *argv)
    _keep_node_list(config, hands)  # the new primary, for this standby's next promote_command
    return status


def fence_self_step(config: Config, hands: Hands) -> str:
    """The VIP first (a full disk must not keep it here), then the marker that tells the
    daemon not to take it back until a majority is reachable again."""
    from repmgr_vip.adapters.statefiles import marker_text, write_atomic
    from repmgr_vip.app import claim

    marker = statepaths.self_fence_marker(config.state_dir)
    with hands.lock(LOCK_TIMEOUT):
        removed = claim.release(hands.network)
        try:
            if hands.files is not None:
                hands.files.write_marker("child nodes disconnected")
            else:
                write_atomic(marker, marker_text("child nodes disconnected"))
        except OSError as exc:
            LOG.error("self-fence marker %s not written (%s): a daemon may take the VIP back "
                      "once a majority answers", marker, exc.strerror)
    message = "self-fenced: VIP released" if removed else "self-fenced: VIP was not held"
    LOG.warning("%s (child nodes disconnected)", message)
    _journal(config, hands, "fence-self", "release", "child nodes disconnected",
             outcome="released" if removed else "not held")
    return message


def fence_self(config: Config, *, own: Hands | None = None) -> str:
    """child_nodes_disconnect_command: a primary that lost its standbys gives the VIP up."""
    reply, why = ask_daemon(config, "fence-self", step_wait(config, fencing=False))
    if reply is not None:
        return str(reply.get("message", ""))
    return fence_self_step(config, _own(config, own, why))


@dataclass(frozen=True)
class Event:
    node_id: int
    name: str
    success: bool
    former_primary: int | None

    def as_request(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "name": self.name, "success": self.success,
                "former_primary": self.former_primary}

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> Event:
        former = request.get("former_primary")
        return cls(_int(request.get("node_id"), 0), str(request.get("name", "")),
                   request.get("success") is True, former if isinstance(former, int) else None)


def event_step(config: Config, hands: Hands, event: Event) -> str:
    """A handled, successful event's VIP step: release on a standby event, and on a primary
    event fence and take the VIP if this node is primary and does not hold it yet."""
    from repmgr_vip.app import claim

    if event.name not in HANDLED_EVENTS:
        return f"event {event.name}: ignored"
    with hands.lock(LOCK_TIMEOUT):
        if event.name in STANDBY_EVENTS:
            removed = claim.release(hands.network)
            _journal(config, hands, f"event {event.name}", "release",
                     "this node is a standby now", outcome="released" if removed else "not held")
            return f"event {event.name}: " + ("VIP released" if removed else "VIP not held")
        local = hands.local(config).view(3.0)
        if not local.is_primary:
            return f"event {event.name}: local node is not primary ({local.error or 'standby'})"
        with contextlib.suppress(VipError):  # the replica VIP never stays on a primary
            from repmgr_vip.app.replica import release_here
            release_here(config)
        if hands.network.holds():
            return f"event {event.name}: VIP already held here"
        return f"event {event.name}: " + fence_and_acquire(
            config, hands, hands.local(config).others(), local.timeline or 0,
            f"event {event.name}")


def handle_event(config: Config, event: Event, *, own: Hands | None = None) -> str:
    """event_notification_command: switchover, rejoin and follow move the VIP too.

    It runs synchronously inside the repmgr command that fired it, so it returns quickly for
    events it does not handle and never waits for a lock held by our own hook.
    """
    from repmgr_vip.adapters.repmgr import INSIDE_HOOK_ENV

    if event.name not in HANDLED_EVENTS:
        return f"event {event.name}: ignored"
    if not event.success:
        return f"event {event.name}: failed event, ignored"
    if os.environ.get(INSIDE_HOOK_ENV):
        return f"event {event.name}: handled by the running repmgr-vip hook"
    fences = event.name in PRIMARY_EVENTS
    reply, why = ask_daemon(config, "event", step_wait(config, fencing=fences),
                            **event.as_request())
    if reply is not None:
        return str(reply.get("message", ""))
    return event_step(config, _own(config, own, why), event)


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
    # the quick start (cli/quick.py) finds the daemon without reading the configuration
    control_socket = shlex.quote(str(statepaths.control_socket(config.state_dir)))
    replica = f"; replica VIP {config.replica.vip.cidr}" if config.replica else ""
    return "\n".join([
        "# repmgr-vip: add to repmgr.conf on this node, then restart repmgrd.",
        f"# addresses: VIP {config.vip.cidr}{replica}",
        "# event_notifications lists the events repmgr-vip acts on; keep any of your own.",
        f"promote_command={value('promote', '--control', control_socket)}",
        f"follow_command={value('follow', '%n')}",
        f"repmgrd_service_start_command={value('start-repmgrd')}",
        f"repmgrd_service_stop_command={value('stop-repmgrd')}",
        f"child_nodes_disconnect_command={value('fence-self')}",
        "event_notification_command="
        + value("event", "--node-id=%n", "--event=%e", "--success=%s", "--former-primary=%p"),
        f"event_notifications='{events}'",
        "",
    ])
