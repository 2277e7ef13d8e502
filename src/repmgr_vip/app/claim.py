"""The one way the VIP is taken and given up on this node.

`actions.acquire`, the hooks and the daemon all claim through `claim`: prove the VIP free
(when the caller has not already), add it, announce it, and say what happened. A held VIP that
also answers from another host is never announced over that host. `promotion_verdict` is the
fencing step of `promote`, kept here so that a model of the cluster runs exactly that code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from repmgr_vip.core.decide import Decision, after_fencing
from repmgr_vip.core.ports import VipAddress

if TYPE_CHECKING:  # a peer's `release` over ssh comes here too: no fencing code to load
    from repmgr_vip.app.fencing import FenceReport, Fencing

HELD = "held"  # it was already here; announced again
ADDED = "added"
REFUSED = "refused"  # another host answered for it

Proof = Callable[[], tuple[str, ...]]  # who else answers for the VIP, judged now


@dataclass(frozen=True)
class Claim:
    outcome: str  # HELD, ADDED or REFUSED
    answered_by: tuple[str, ...] = ()  # who answered the proof (REFUSED, or forced)
    held_before: bool = False  # REFUSED only: the VIP was (and stays) on this node

    @property
    def ok(self) -> bool:
        """The VIP is here now and nobody else answered (or force said go)."""
        return self.outcome != REFUSED


def arp_proof(address: VipAddress) -> Proof:
    """A fresh ARP probe as the proof (the daemon and `acquire` have no fencing round)."""
    return lambda: address.probe().answered_by


def claim(address: VipAddress, *, proof: Proof | None = None, force: bool = False) -> Claim:
    """Adds and announces the VIP unless the proof shows another holder.

    proof None: the caller already proved the VIP free (a fencing round). force adds over an
    answer, but never while the VIP is also held here: that is two holders already.
    """
    answered = proof() if proof is not None else ()
    if answered:
        held = address.holds()
        if held or not force:
            return Claim(REFUSED, answered, held)
    added = address.add()
    address.announce()
    return Claim(ADDED if added else HELD, answered)


def release(address: VipAddress) -> bool:
    """Removes the VIP here; True if it was held."""
    return address.remove()


@dataclass
class PromotionVerdict:
    report: FenceReport
    decision: Decision
    proof: Proof | None  # still to pass before the VIP is added (None: already proven)


def promotion_verdict(fencing: Fencing, policy: str) -> PromotionVerdict:
    """promote's fencing step: wait for proof or confirmations, then judge on true inputs.

    When every node confirmed its release before any probe finished, the promotion may start,
    but the proof is still owed: it is handed back and the VIP is added only after it.
    """
    report = fencing.wait(confirmations_suffice=True, lease_wait=True)
    answered: tuple[str, ...] | None = report.answered_by
    proof: Proof | None = None
    if fencing.all_confirmed and report.answered_by:
        # every node said it released the VIP and something still answered: judge by a probe
        # taken after the last confirmation, before promoting (a promotion cannot be undone)
        report.answered_by = answered = fencing.proven_free()
    elif fencing.all_confirmed and fencing.proof_pending:
        answered, proof = None, fencing.proven_free
    decision = after_fencing(answered, policy, fence_ran=bool(report.fenced),
                             all_confirmed=fencing.all_confirmed)
    return PromotionVerdict(report, decision, proof)
