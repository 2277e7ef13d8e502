"""Acquire and release the VIP on this node, safely and idempotently.

Acquire probes first: if another host answers ARP for the VIP it refuses (exit 3) unless
forced, because a VIP on two nodes is the worst outcome this tool exists to prevent.
"""

from __future__ import annotations

from repmgr_vip.errors import RefusedError
from repmgr_vip.network import VipNetwork


def acquire(network: VipNetwork, *, force: bool = False) -> str:
    vip = network.config.vip
    probe = network.probe()
    if network.holds():
        if probe.in_use:
            raise RefusedError(
                f"{vip.ip} is on {vip.interface} here AND answers from "
                f"{', '.join(probe.answered_by)}: two holders; release it on one of them"
            )
        network.announce()
        return f"{vip.cidr} already held on {vip.interface}; announced again"
    if probe.in_use and not force:
        raise RefusedError(
            f"refusing to add {vip.cidr}: it answers ARP from {', '.join(probe.answered_by)}; "
            "release it on that host first (`repmgr-vip release`), or pass --force"
        )
    network.add()
    network.announce()
    forced = f" (forced; it also answered from {', '.join(probe.answered_by)})" if (
        probe.in_use) else ""
    return f"added {vip.cidr} on {vip.interface} and announced it{forced}"


def release(network: VipNetwork) -> str:
    vip = network.config.vip
    if network.remove():
        return f"removed {vip.cidr} from {vip.interface}"
    return f"{vip.cidr} not on {vip.interface}; nothing to do"
