"""Pure decisions: plain facts in, an action and a human-readable reason out. No I/O here.

Keeping every rule in small functions over immutable data lets the tests (including
property-based ones) exercise the exact code that guards the VIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from repmgr_vip.core.model import NodeView


class Action(Enum):
    ACQUIRE = "acquire"
    RELEASE = "release"
    KEEP = "keep"  # leave things as they are
    REFUSE = "refuse"  # would be unsafe; do nothing and report why
    PROMOTE_WITHOUT_VIP = "promote-without-vip"
    ANNOUNCE = "announce"  # holding; send gratuitous ARP again
    FENCE_CONFLICT = "fence-conflict"  # holding, and another host answers too


SPLIT_BRAIN = "split-brain"  # another primary on our timeline: nobody may hold the VIP
CONFLICT = "conflict"  # a host we cannot account for answers for the VIP


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    alarm: str = ""  # SPLIT_BRAIN, CONFLICT or "": what the metrics and status count


@dataclass(frozen=True)
class Peer:
    node_id: int
    node_name: str
    node_type: str  # primary | standby | witness, as registered
    view: NodeView

    @property
    def is_data_primary(self) -> bool:
        """A primary of the cluster's data; a witness runs its own, unrelated primary."""
        return self.node_type != "witness" and self.view.is_primary


def split_brain_advice(local_name: str, other_name: str, timeline: int) -> str:
    """The one rule for same-timeline primaries: nobody can tell which is legitimate."""
    return (f"{local_name} and {other_name} are both primary on timeline {timeline}: "
            "cannot tell which is legitimate, so neither holds the VIP; stop one of them and "
            "rejoin it as a standby (`repmgr node rejoin`), then the other takes the VIP")


def legitimacy(local_name: str, local: NodeView, peers: Sequence[Peer]) -> Decision:
    """Should this node hold the VIP at start-up? Only as the one primary on the newest timeline."""
    if not local.reachable:
        return Decision(Action.RELEASE, f"local PostgreSQL is not reachable ({local.error})")
    if local.in_recovery:
        return Decision(Action.RELEASE, "local PostgreSQL is a standby (in recovery)")
    for peer in sorted(peers, key=lambda p: p.node_id):
        if not peer.is_data_primary or peer.view.timeline is None or local.timeline is None:
            continue
        if peer.view.timeline > local.timeline:
            return Decision(Action.RELEASE, f"{peer.node_name} is primary on a newer timeline "
                            f"({peer.view.timeline} > {local.timeline}); this is a stale primary")
        if peer.view.timeline == local.timeline:
            return Decision(Action.RELEASE, split_brain_advice(
                local_name, peer.node_name, local.timeline), alarm=SPLIT_BRAIN)
    return Decision(Action.ACQUIRE, f"primary on timeline {local.timeline}, "
                    f"no other primary among {len(peers)} peer(s)")


def after_fencing(answered_by: tuple[str, ...] | None, policy: str, *, fence_ran: bool,
                  all_confirmed: bool = False) -> Decision:
    """Before a promotion: go ahead only when nobody else answers for the VIP.

    When every registered node confirmed its release, whoever answers is outside the cluster
    (a stray device, a spoofer): no node is fenced for it, and the promotion still waits.
    answered_by None: no probe has finished yet; only confirmations from every node let the
    promotion start then, and the VIP waits for the probe.
    """
    if answered_by is None:
        if all_confirmed:
            return Decision(Action.ACQUIRE, "every registered node confirmed its release; "
                            "the VIP is added once an ARP probe shows it free")
        answered_by = ("unknown (no probe result)",)
    if not answered_by:
        return Decision(Action.ACQUIRE, "VIP is free (no ARP answer)")
    holders = ", ".join(answered_by)
    if all_confirmed:
        why = (f"every registered node confirmed its release, yet the VIP answers from "
               f"{holders}: a host outside the cluster holds it; find it and remove the address")
    else:
        why = (f"VIP still answers from {holders}"
               + (" after fence_command" if fence_ran else " and no fence_command is configured"))
    if policy == "promote-without-vip":
        return Decision(Action.PROMOTE_WITHOUT_VIP, why + "; promoting without the VIP (policy)",
                        alarm=CONFLICT)
    return Decision(Action.REFUSE, why + "; refusing to promote (fencing.when_vip_not_free)",
                    alarm=CONFLICT)


# --- the reconciling daemon -------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything one daemon cycle knows, gathered before deciding."""

    now: float  # monotonic seconds
    local_name: str
    local: NodeView
    local_surely_down: bool  # connection refused: PostgreSQL is not running
    peers: tuple[Peer, ...]  # every other registered, active node
    holds_vip: bool
    interface_up: bool
    foreign_macs: tuple[str, ...] | None  # other hosts answering for the VIP; None: not probed
    self_fence_age: float | None  # seconds since child_nodes_disconnect_command fenced us
    reannounce_due: bool
    release_request_age: float | None = None  # since a promoting peer asked us to release
    promoting: bool = False  # this daemon runs a promotion of its node (the VIP went up first)


@dataclass(frozen=True)
class Memory:
    """What the daemon carries from one cycle to the next."""

    majority_seen_at: float  # monotonic time the cluster majority was last reachable
    local_failures: int = 0  # consecutive failed local queries
    max_peer_timeline: int = 0  # highest timeline any peer has shown us
    self_fenced: bool = False  # this cycle's verdict; the daemon lifts the marker when False
    local_down_since: float | None = None  # monotonic time local PostgreSQL stopped answering


@dataclass(frozen=True)
class Policy:
    isolation_grace: float
    local_failures_to_release: int = 2
    # repmgr saw the standbys go: trust that over our own (possibly older) view for a while
    self_fence_hold: float = 5.0
    # a promoting peer asked us to release: its promotion takes a moment to show a newer
    # timeline, and re-adding meanwhile would put the VIP on two nodes; short, because a
    # promotion that never shows must not leave a legitimate primary without the VIP for long
    release_request_hold: float = 2.5
    # local PostgreSQL is down and no other node is primary (yet): keep the VIP this long, so
    # clients get "connection refused" at once instead of silence (a lost SYN costs them a
    # full retransmission after the promotion); a promoting standby asks for it (fencing).
    # 0: drop it as soon as PostgreSQL is known to be down
    keep_while_down: float = 0.0


def _majority(snapshot: Snapshot) -> tuple[bool, str]:
    voters = 1 + len(snapshot.peers)
    reachable = 1 + sum(1 for p in snapshot.peers if p.view.reachable)
    return reachable * 2 > voters, f"{reachable}/{voters} nodes reachable"


def _hold_or_acquire(snapshot: Snapshot, why: str) -> Decision:
    if not snapshot.holds_vip:
        if not snapshot.interface_up:
            return Decision(Action.KEEP, f"{why}; interface is down, cannot add the VIP")
        return Decision(Action.ACQUIRE, f"{why}; VIP missing here")
    if snapshot.foreign_macs:
        return Decision(Action.FENCE_CONFLICT, f"{why}; CONFLICT: VIP also answers from "
                        f"{', '.join(snapshot.foreign_macs)}", alarm=CONFLICT)
    if snapshot.reannounce_due:
        return Decision(Action.ANNOUNCE, f"holding: {why}; periodic announcement")
    return Decision(Action.KEEP, f"holding: {why}")


def _drop(snapshot: Snapshot, why: str, alarm: str = "") -> Decision:
    if snapshot.holds_vip:
        return Decision(Action.RELEASE, why, alarm)
    return Decision(Action.KEEP, f"not holding: {why}", alarm)


def decide_cycle(snapshot: Snapshot, memory: Memory, policy: Policy) -> tuple[Decision, Memory]:
    """One reconcile step: should this node hold the VIP right now?

    A healthy primary never loses the VIP to a single failed query; a node that is a standby,
    a stale primary or cut off from the majority lets it go.
    """
    peer_timelines = [p.view.timeline for p in snapshot.peers
                      if p.view.reachable and p.view.timeline is not None]
    has_majority, counted = _majority(snapshot)
    age = snapshot.self_fence_age
    self_fenced = age is not None and (age < policy.self_fence_hold or not has_majority)
    memory = Memory(
        majority_seen_at=snapshot.now if has_majority else memory.majority_seen_at,
        local_failures=0 if snapshot.local.reachable else memory.local_failures + 1,
        max_peer_timeline=max([memory.max_peer_timeline, *peer_timelines]),
        self_fenced=self_fenced,
        local_down_since=None if snapshot.local.reachable else (
            snapshot.now if memory.local_down_since is None else memory.local_down_since),
    )
    local = snapshot.local
    if not local.reachable:
        return _local_unreachable(snapshot, memory, policy, has_majority, counted)
    if local.in_recovery:
        if snapshot.promoting and snapshot.holds_vip:
            return Decision(Action.KEEP, "holding: local PostgreSQL is being promoted (the VIP "
                            "went up first; taken back if the promotion fails)"), memory
        return _drop(snapshot, "local PostgreSQL is a standby"), memory
    timeline = local.timeline or 0
    for peer in snapshot.peers:
        if peer.is_data_primary and (peer.view.timeline or 0) > timeline:
            return _drop(snapshot, f"{peer.node_name} is primary on newer timeline "
                         f"{peer.view.timeline} > {timeline}: this is a stale primary"), memory
    for peer in snapshot.peers:
        if peer.is_data_primary and (peer.view.timeline or 0) == timeline:
            why = split_brain_advice(snapshot.local_name, peer.node_name, timeline)
            return _drop(snapshot, why, alarm=SPLIT_BRAIN), memory
    why = f"primary on timeline {timeline}, {counted}"
    if self_fenced:
        return _drop(snapshot, f"self-fenced after losing the standbys; {counted}"), memory
    asked = snapshot.release_request_age
    if asked is not None and asked < policy.release_request_hold and not snapshot.holds_vip:
        # only acquiring waits: a VIP this node's own promote hook added since is kept
        return Decision(Action.KEEP, f"not acquiring: a promoting node asked this one to release "
                        f"the VIP {asked:.1f} s ago; waiting up to "
                        f"{policy.release_request_hold:g} s for its new timeline"), memory
    if has_majority:
        return _hold_or_acquire(snapshot, why), memory
    isolated_for = snapshot.now - memory.majority_seen_at
    if len(snapshot.peers) == 1 and 0 < memory.max_peer_timeline < timeline:
        # two nodes, no witness: repmgr promotes without a majority, so the node it promoted
        # after losing contact holds the newest timeline and may keep the VIP
        return _hold_or_acquire(snapshot, why + f", newest timeline (peers last on "
                                f"{memory.max_peer_timeline})"), memory
    if isolated_for > policy.isolation_grace:
        return _drop(snapshot, f"isolated: {counted} for {isolated_for:.1f} s "
                     f"> isolation_grace {policy.isolation_grace:g} s"), memory
    if snapshot.holds_vip:
        return Decision(Action.KEEP, f"holding: {why}; within isolation grace "
                        f"({isolated_for:.1f}/{policy.isolation_grace:g} s)"), memory
    return Decision(Action.KEEP, f"not acquiring: {why} is not a majority"), memory


def _local_unreachable(snapshot: Snapshot, memory: Memory, policy: Policy, has_majority: bool,
                       counted: str) -> tuple[Decision, Memory]:
    """Local PostgreSQL does not answer. A dead primary's VIP is harmless (nothing accepts a
    write behind it) and better than silence for clients, until someone else may take it."""
    local = snapshot.local
    other = next((p for p in snapshot.peers if p.is_data_primary), None)
    if other is not None:
        return _drop(snapshot, f"local PostgreSQL does not answer ({local.error}) and "
                     f"{other.node_name} is primary"), memory
    if snapshot.foreign_macs:
        return _drop(snapshot, f"local PostgreSQL does not answer ({local.error}) and the "
                     f"VIP also answers from {', '.join(snapshot.foreign_macs)}"), memory
    if not (snapshot.local_surely_down
            or memory.local_failures >= policy.local_failures_to_release):
        return Decision(Action.KEEP, f"local query failed once ({local.error}); "
                        "not acting on a single failure"), memory
    why = f"local PostgreSQL is down ({local.error})"
    if memory.self_fenced:
        return _drop(snapshot, f"{why}; self-fenced after losing the standbys"), memory
    isolated_for = snapshot.now - memory.majority_seen_at
    if not has_majority and isolated_for > policy.isolation_grace:
        return _drop(snapshot, f"{why}; isolated: {counted} for {isolated_for:.1f} s"), memory
    since = memory.local_down_since
    down_for = snapshot.now - (snapshot.now if since is None else since)
    if snapshot.holds_vip and down_for < policy.keep_while_down:
        return Decision(Action.KEEP, f"holding: {why}, no other node is primary: clients are "
                        "refused at once here until a promoted standby asks for the VIP "
                        f"({down_for:.1f}/{policy.keep_while_down:g} s)"), memory
    return _drop(snapshot, why), memory
