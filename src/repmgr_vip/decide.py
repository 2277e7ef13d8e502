"""Pure decisions: plain facts in, an action and a human-readable reason out. No I/O here.

Keeping every rule in small functions over immutable data lets the tests (including
property-based ones) exercise the exact code that guards the VIP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from repmgr_vip.cluster import NodeView


class Action(Enum):
    ACQUIRE = "acquire"
    RELEASE = "release"
    KEEP = "keep"  # leave things as they are
    REFUSE = "refuse"  # would be unsafe; do nothing and report why
    PROMOTE_WITHOUT_VIP = "promote-without-vip"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def legitimacy(local: NodeView, peers: Mapping[int, NodeView]) -> Decision:
    """Should this node hold the VIP at start-up? Only as the one primary on the newest timeline."""
    if not local.reachable:
        return Decision(Action.RELEASE, f"local PostgreSQL is not reachable ({local.error})")
    if local.in_recovery:
        return Decision(Action.RELEASE, "local PostgreSQL is a standby (in recovery)")
    for node_id, peer in sorted(peers.items()):
        if not peer.is_primary or peer.timeline is None or local.timeline is None:
            continue
        if peer.timeline > local.timeline:
            return Decision(Action.RELEASE, f"node {node_id} is primary on a newer timeline "
                            f"({peer.timeline} > {local.timeline}); this is a stale primary")
        if peer.timeline == local.timeline:
            return Decision(Action.REFUSE, f"node {node_id} is also primary on timeline "
                            f"{local.timeline}; refusing to pick one, resolve the split brain")
    return Decision(Action.ACQUIRE, f"primary on timeline {local.timeline}, "
                    f"no other primary among {len(peers)} peer(s)")


def after_fencing(answered_by: tuple[str, ...], policy: str, *, fence_ran: bool) -> Decision:
    """Before a promotion: go ahead only when nobody else answers for the VIP."""
    if not answered_by:
        return Decision(Action.ACQUIRE, "VIP is free (no ARP answer)")
    holders = ", ".join(answered_by)
    why = (f"VIP still answers from {holders}"
           + (" after fence_command" if fence_ran else " and no fence_command is configured"))
    if policy == "promote-without-vip":
        return Decision(Action.PROMOTE_WITHOUT_VIP, why + "; promoting without the VIP (policy)")
    return Decision(Action.REFUSE, why + "; refusing to promote (fencing.when_vip_not_free)")
