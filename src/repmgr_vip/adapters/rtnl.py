"""One interface's state read over rtnetlink, in-process: what `ip -j address show` says.

Why: the daemon reads its interface several times a period (and its replica thread too). A
fork+exec of `ip` from a 40 MiB Python process costs milliseconds of CPU each time; two
netlink dumps on a socket cost a few tens of microseconds. Any netlink error raises OSError
and the caller falls back to `ip`: a failed read must never look like "no address".
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import math
import os
import socket
import struct
from collections.abc import Iterator

from repmgr_vip.core.model import InterfaceState

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_ADDRESS, IFLA_IFNAME = 1, 3
IFA_ADDRESS, IFA_LOCAL, IFA_CACHEINFO, IFA_FLAGS = 1, 2, 6, 8
FOREVER = 0xFFFFFFFF  # INFINITY_LIFE_TIME
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000
_NLMSGHDR = struct.Struct("=LHHLL")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_CACHEINFO = struct.Struct("=IIII")  # struct ifa_cacheinfo: prefered, valid, cstamp, tstamp
_MAX_REPLY = 1 << 16
_LINK_WANTED = frozenset({IFLA_ADDRESS, IFLA_IFNAME})
_ADDRESS_WANTED = frozenset({IFA_ADDRESS, IFA_LOCAL, IFA_CACHEINFO, IFA_FLAGS})
_SEQUENCE = itertools.count(int.from_bytes(os.urandom(4), "little"))


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _attributes(data: bytes, wanted: frozenset[int] | None = None) -> dict[int, bytes]:
    """Route attributes (type -> payload) of one message body; the first of a type wins.

    With `wanted`, only those types, and the walk stops once it has them all: a link carries
    dozens of attributes (statistics...) and the daemon needs two of them every read.
    """
    found: dict[int, bytes] = {}
    offset = 0
    end = len(data)
    while offset + 4 <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < 4:
            break
        if wanted is None or kind in wanted:
            found.setdefault(kind, data[offset + 4:offset + length])
            if wanted is not None and len(found) == len(wanted):
                break
        offset += (length + 3) & ~3
    return found


def _exchange(sock: socket.socket, kind: int, payload: bytes, *, dump: bool = True,
              extra: int = 0) -> list[tuple[int, bytes]]:
    """One request; its (type, body) replies: a dump's until NLMSG_DONE, else the single
    answer (or the acknowledgement, with NLM_F_ACK in `extra`). OSError on any error (errno
    kept) or malformed reply."""
    sequence = next(_SEQUENCE) & 0xFFFFFFFF
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0) | extra
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, flags, sequence, 0)
              + payload)
    replies: list[tuple[int, bytes]] = []
    while True:
        data = sock.recv(_MAX_REPLY)
        if not data:
            raise OSError("rtnetlink: empty reply")
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, mtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                raise OSError("rtnetlink: malformed reply")
            body = data[offset + _NLMSGHDR.size:offset + length]
            offset += _align4(length)
            if seq != sequence:
                continue
            if mtype == NLMSG_DONE:
                return replies
            if mtype == NLMSG_ERROR:
                error = -struct.unpack_from("=i", body)[0]
                if error:
                    raise OSError(error, f"rtnetlink: {os.strerror(error)}")
                return replies
            replies.append((mtype, body))
            if not dump:
                return replies


def _open(timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _link(sock: socket.socket, ifname: str) -> tuple[int, bool, str] | None:
    """(index, up, MAC) of `ifname`, or None when there is no such interface.

    Asked by name (RTM_GETLINK with IFLA_IFNAME, no dump): one reply instead of every link of
    the host with all their attributes.
    """
    name = ifname.encode() + b"\0"
    attribute = _RTATTR.pack(_RTATTR.size + len(name), IFLA_IFNAME) + name
    attribute += b"\0" * (_align4(len(attribute)) - len(attribute))
    try:
        replies = _exchange(sock, RTM_GETLINK, _IFINFOMSG.pack(0, 0, 0, 0, 0) + attribute,
                            dump=False)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
    for mtype, body in replies:
        if mtype != RTM_NEWLINK or len(body) < _IFINFOMSG.size:
            continue
        attributes = _attributes(body[_IFINFOMSG.size:], _LINK_WANTED)
        if attributes.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace") != ifname:
            raise OSError(f"rtnetlink: asked for {ifname}, got another link")
        _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body)
        up = bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)
        return index, up, ":".join(f"{byte:02x}" for byte in attributes.get(IFLA_ADDRESS, b""))
    raise OSError(f"rtnetlink: no answer for link {ifname}")


def _addresses(sock: socket.socket, index: int, family: int
               ) -> Iterator[tuple[int, int, int, dict[int, bytes]]]:
    """(family, prefix length, flags, attributes) of every address on interface `index`."""
    for mtype, body in _exchange(sock, RTM_GETADDR, _IFADDRMSG.pack(family, 0, 0, 0, 0)):
        if mtype != RTM_NEWADDR or len(body) < _IFADDRMSG.size:
            continue
        address_family, prefixlen, flags, _scope, address_index = _IFADDRMSG.unpack_from(body)
        if address_index != index or address_family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if family != socket.AF_UNSPEC and address_family != family:
            continue
        attributes = _attributes(body[_IFADDRMSG.size:], _ADDRESS_WANTED)
        if IFA_FLAGS in attributes and len(attributes[IFA_FLAGS]) >= 4:
            flags = struct.unpack_from("=I", attributes[IFA_FLAGS])[0]
        yield address_family, prefixlen, flags, attributes


def read_interface(ifname: str, *, ipv6: bool = True, timeout: float = 1.0) -> InterfaceState:
    """The state of `ifname` as `ip -j [-4] address show dev IFNAME` reports it.

    Addresses as "ip/len"; an IPv6 address still in (or refused by) the kernel's DAD goes to
    `pending`. ipv6=False reads IPv4 only (`ip -4`).
    """
    with _open(timeout) as sock:
        link = _link(sock, ifname)
        if link is None:
            return InterfaceState(False, False, "", ())
        index, up, mac = link
        usable: list[str] = []
        pending: list[str] = []
        family = socket.AF_UNSPEC if ipv6 else socket.AF_INET
        for _family, prefixlen, flags, attributes in _addresses(sock, index, family):
            raw = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
            if raw is None:
                continue
            text = f"{ipaddress.ip_address(raw)}/{prefixlen}"
            waiting = flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
            (pending if waiting else usable).append(text)
        return InterfaceState(True, up, mac, tuple(usable), tuple(pending))


RTM_DELADDR = 21
NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x4, 0x200, 0x400
IFA_F_NODAD = 0x02


def _attribute(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (_align4(length) - length)


def change_address(ifname: str, cidr: str, *, add: bool, lifetime: int = 0,
                   nodad: bool = False, timeout: float = 1.0) -> None:
    """`ip address add|del CIDR dev IFNAME [valid_lft N preferred_lft N] [nodad]` in-process.

    The daemon moves the VIP in a failover: a fork+exec of `ip` from it costs milliseconds
    while no node answers for the VIP. OSError on any refusal (EEXIST: already there;
    EADDRNOTAVAIL: not there); the caller decides, and falls back to `ip` on others.
    """
    interface = ipaddress.ip_interface(cidr)
    family = socket.AF_INET if interface.version == 4 else socket.AF_INET6
    index = socket.if_nametoindex(ifname)
    flags = IFA_F_NODAD if nodad and interface.version == 6 else 0
    body = _IFADDRMSG.pack(family, interface.network.prefixlen, flags, 0, index)
    raw = interface.ip.packed
    body += _attribute(IFA_LOCAL, raw) + _attribute(IFA_ADDRESS, raw)
    if add and lifetime:
        body += _attribute(IFA_CACHEINFO, _CACHEINFO.pack(lifetime, lifetime, 0, 0))
    kind = RTM_NEWADDR if add else RTM_DELADDR
    extra = NLM_F_ACK | ((NLM_F_CREATE | NLM_F_EXCL) if add else 0)
    with _open(timeout) as sock:
        _exchange(sock, kind, body, dump=False, extra=extra)


def valid_lifetime(ifname: str, ip: str, *, timeout: float = 1.0) -> float | None:
    """Seconds the IPv4 address `ip` on `ifname` has left, as `ip -j -4 address show` shows
    `valid_life_time` (whole seconds, the kernel's own IFA_CACHEINFO figure): inf when
    permanent, None when the interface or the address is not there.

    Why: the lease keeper asks this every cycle, on every node; a fork of `ip` for it cost
    each standby's daemon about 1.4 % of a core.
    """
    with _open(timeout) as sock:
        link = _link(sock, ifname)
        if link is None:
            return None
        for _family, _prefixlen, _flags, attributes in _addresses(sock, link[0],
                                                                   socket.AF_INET):
            raw = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
            if raw is None or str(ipaddress.ip_address(raw)) != ip:
                continue
            info = attributes.get(IFA_CACHEINFO, b"")
            if len(info) < _CACHEINFO.size:
                return math.inf  # no lifetime attached: ip prints none either (forever)
            _preferred, valid, _created, _updated = _CACHEINFO.unpack_from(info)
            return math.inf if valid >= FOREVER else float(valid)
    return None
