"""Acquire and release the VIP on this node, safely and idempotently.

Acquire probes first: if another host answers ARP for the VIP it refuses (exit 3) unless
forced, because a VIP on two nodes is the worst outcome this tool exists to prevent.
"""

from __future__ import annotations

from repmgr_vip.adapters.network import VipNetwork
from repmgr_vip.app import claim
from repmgr_vip.core.errors import RefusedError


def acquire(network: VipNetwork, *, force: bool = False) -> str:
    vip = network.config.vip
    result = claim.claim(network, proof=claim.arp_proof(network), force=force)
    answered = ", ".join(result.answered_by)
    if result.held_before:
        raise RefusedError(f"{vip.ip} is on {vip.interface} here AND answers from {answered}: "
                           "two holders; release it on one of them")
    if not result.ok:
        raise RefusedError(
            f"refusing to add {vip.cidr}: it answers ARP from {answered}; "
            "release it on that host first (`repmgr-vip release`), or pass --force"
        )
    if result.outcome == claim.HELD:
        return f"{vip.cidr} already held on {vip.interface}; announced again"
    forced = f" (forced; it also answered from {answered})" if answered else ""
    return f"added {vip.cidr} on {vip.interface} and announced it{forced}"


def release(network: VipNetwork) -> str:
    vip = network.config.vip
    if claim.release(network):
        return f"removed {vip.cidr} from {vip.interface}"
    return f"{vip.cidr} not on {vip.interface}; nothing to do"
