"""A peer is promoting and asks this node to let go of the VIP.

It asks in one of two ways: `repmgr-vip release` run by its ssh (a fresh process here), or the
`release` op of our daemon's control socket, reached over its SSH master's forwarded socket
(sshmux: the warm link; no process started here). Both go through `release_for_peer`: the
hold marker first, then the one release path (claim.release). The marker keeps our daemon
from adding the VIP back before the peer's new timeline shows (decide: release_request_hold);
both run under the node's VIP lock, and the daemon acts only under it, so no cycle slips in
between the marker and the removal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from repmgr_vip.app import claim
from repmgr_vip.config.schema import Config
from repmgr_vip.core.errors import VipError

if TYPE_CHECKING:
    from repmgr_vip.app.hooks import Hands

LOCK_WAIT = 30.0  # as the CLI's release: a step under way here finishes first
MAX_ASKER = 200  # characters of the asker's name kept in the marker and the journal


def released_text(config: Config, released: bool) -> str:
    vip = config.vip
    if released:
        return f"removed {vip.cidr} from {vip.interface}"
    return f"{vip.cidr} not on {vip.interface}; nothing to do"


def release_for_peer(config: Config, hands: Hands, asker: str, *,
                     answered: Callable[[bool], object] | None = None,
                     refuse: bool = True) -> bool:
    """The one way a peer's request takes the VIP off this node, over ssh or the link: the
    stale-SYN refusal opened, our daemon held off, the VIP released, the peer answered, the
    refusal started, the journal written. True if the VIP was here. The caller holds the
    node's VIP lock. A full disk only loses the hold, never the release.

    `answered(released)` runs the moment the address is gone (the link's reply: the peer
    adds the VIP on it, and clients see no node answer until then); the journal follows.
    refuse=False: no refusal (a stale copy the release retrier removes: the peer holds the
    VIP already, and every millisecond spent opening the refusal is two holders)."""
    from repmgr_vip.adapters.system import FileState
    from repmgr_vip.app.hooks import _journal

    started = time.monotonic()
    files = hands.files if hands.files is not None else FileState(config)
    # clients still send to our MAC until the peer's announcement reaches them: answer them
    # from the removal on (the socket is open before it)
    refusal = hands.network.stale_refusal() if refuse else None
    try:
        with contextlib.suppress(OSError):
            files.write_release_request(f"release requested by {asker}")
        released = claim.release(hands.network)
    except BaseException:
        if refusal is not None:
            refusal.cancel()
        raise
    removed_at = time.time()  # when the VIP left: the wall clock every journal shares
    if answered is not None:
        answered(released)
    if refusal is not None:
        (refusal.start if released else refusal.cancel)()
    _journal(config, hands, "release", "release", f"requested by {asker}",
             outcome="released" if released else "not held",
             release_ms=round((time.monotonic() - started) * 1000, 1),
             removed_at=round(removed_at, 4), refusing=bool(released and refusal is not None))
    return released


def serve_release(config: Config, hands: Hands, request: Mapping[str, Any],
                  reply: Callable[[dict[str, Any]], object]) -> None:
    """The daemon's `release` op: a peer asked over its warm link. Replies with the MAC of the
    VIP's interface, so the peer knows which ARP answers were ours. Idempotent."""
    asker = f"{str(request.get('from') or '?')[:MAX_ASKER]} over the link"
    macs: list[str] = []
    with contextlib.suppress(VipError):  # read before: nothing between removal and reply
        mac = hands.network.interface_state().mac
        if mac:
            macs.append(mac.lower())
    with hands.lock(LOCK_WAIT):
        release_for_peer(config, dataclasses.replace(hands, via="link"), asker,
                         answered=lambda released: reply({
                             "ok": True, "message": released_text(config, released),
                             "macs": macs}))
