"""Plain facts the pure core reasons about: what a node says, what the wire and the interface show.

They live apart from the adapters that produce them (psycopg, `ip`, `arping`), so the decision
code and the ports import no I/O at all (tests/unit/test_layers.py holds that line).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from repmgr_vip.core.conninfo import parse_conninfo
from repmgr_vip.core.errors import VipError


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


# `release` over ssh names the MAC of the interface it removed the VIP from on a line of its
# own, as the warm link's reply carries it in a field: the promoting node's proof, taken a
# moment before, may have heard that MAC, and it is free of that node now (fencing._accounted)
RELEASED_FROM_MAC = "released-from-mac"


@dataclass(frozen=True)
class ProbeResult:
    """What an RFC 5227 ARP probe for the VIP saw: the MACs of other hosts that answered."""

    answered_by: tuple[str, ...]
    # every MAC that answered within the whole window, not only the first: such a proof,
    # taken before the old holder confirmed its release, frees the VIP with that confirmation
    # (fencing: the late prior proof of a hook's round)
    complete: bool = False

    @property
    def in_use(self) -> bool:
        return bool(self.answered_by)


@dataclass(frozen=True)
class InterfaceState:
    exists: bool
    up: bool
    mac: str
    addresses: tuple[str, ...]  # "a.b.c.d/len" or "v6/len", usable
    pending: tuple[str, ...] = ()  # IPv6 still in (or failed) the kernel's DAD: not usable

    def address_as(self, ip: str) -> str | None:
        """`ip` as configured here ("ip/len"), or None; an exact match, never a substring
        (IPv6 compared in one spelling)."""
        return _find(self.addresses, ip)

    def present_as(self, ip: str) -> str | None:
        """Like address_as, also counting an IPv6 address still tentative or failed DAD."""
        return _find(self.addresses, ip) or _find(self.pending, ip)

    def held_map(self, cidrs: Iterable[str]) -> dict[str, bool]:
        """Each VIP address ("ip/len" as configured) and whether it is here, usable."""
        return {cidr: self.address_as(cidr.split("/", 1)[0]) is not None for cidr in cidrs}

    def holds_all(self, cidrs: Iterable[str]) -> bool:
        """Whether every address of the VIP is here, usable: what "holds the VIP" means."""
        return all(self.held_map(cidrs).values())


def _find(addresses: tuple[str, ...], ip: str) -> str | None:
    wanted = normal_ip(ip)
    return next((a for a in addresses if normal_ip(a.split("/", 1)[0]) == wanted), None)


def normal_ip(ip: str) -> str:
    """One spelling per address, so 2001:DB8::1 and 2001:db8:0::1 compare equal."""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


@dataclass(frozen=True)
class NodeRecord:
    """A row of repmgr.nodes."""

    node_id: int
    node_name: str
    node_type: str  # primary | standby | witness
    active: bool
    conninfo: str
    upstream_node_id: int

    @cached_property
    def host(self) -> str:
        """The conninfo's host, or "" when the conninfo cannot be parsed (see conninfo_error).

        Cluster data is input: a malformed row must make that node unreachable, not crash
        the hook or the daemon. Parsed once per record: the daemon's threads ask every
        second for every peer, and each parse runs shlex over the whole conninfo.
        """
        try:
            return parse_conninfo(self.conninfo).get("host", "")
        except (VipError, ValueError):
            return ""

    @property
    def conninfo_error(self) -> str:
        try:
            parse_conninfo(self.conninfo)
        except (VipError, ValueError) as exc:
            return " ".join(str(exc).split())
        return ""


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    warning: bool = False

    def line(self) -> str:
        status = "ok  " if self.ok and not self.warning else ("WARN" if self.ok else "FAIL")
        return f"{status}  {self.name}: {self.detail}"
