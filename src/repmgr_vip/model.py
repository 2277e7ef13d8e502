"""Plain facts the pure core reasons about: what a node says, what the wire and the interface show.

They live apart from the adapters that produce them (psycopg, `ip`, `arping`), so the decision
code and the ports import no I/O at all (tests/unit/test_layers.py holds that line).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeView:
    """What one node says about itself right now."""

    node_id: int
    reachable: bool
    in_recovery: bool | None = None
    timeline: int | None = None
    error: str = ""

    @property
    def is_primary(self) -> bool:
        return self.reachable and self.in_recovery is False


@dataclass(frozen=True)
class ProbeResult:
    """What an RFC 5227 ARP probe for the VIP saw: the MACs of other hosts that answered."""

    answered_by: tuple[str, ...]

    @property
    def in_use(self) -> bool:
        return bool(self.answered_by)


@dataclass(frozen=True)
class InterfaceState:
    exists: bool
    up: bool
    mac: str
    addresses: tuple[str, ...]  # "a.b.c.d/len"

    def address_as(self, ip: str) -> str | None:
        """`ip` as configured here ("ip/len"), or None; an exact match, never a substring."""
        return next((a for a in self.addresses if a.split("/", 1)[0] == ip), None)
