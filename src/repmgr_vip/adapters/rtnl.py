"""One interface's state read over rtnetlink, in-process: what `ip -j address show` says.

Why: the daemon reads its interface several times a period (and its replica thread too). A
fork+exec of `ip` from a 40 MiB Python process costs milliseconds of CPU each time; two
netlink dumps on a socket cost a few tens of microseconds. Any netlink error raises OSError
and the caller falls back to `ip`: a failed read must never look like "no address".
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from repmgr_vip.core.model import InterfaceState

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_ADDRESS, IFLA_IFNAME = 1, 3
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000
_NLMSGHDR = struct.Struct("=LHHLL")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_MAX_REPLY = 1 << 16


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _attributes(data: bytes) -> dict[int, bytes]:
    """Route attributes (type -> payload) of one message body; the first of a type wins."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        found.setdefault(kind, data[offset + _RTATTR.size:offset + length])
        offset += _align4(length)
    return found


def _dump(sock: socket.socket, kind: int, payload: bytes) -> list[tuple[int, bytes]]:
    """One dump request; its (type, body) replies. OSError on any error or malformed reply."""
    sequence = int.from_bytes(os.urandom(4), "little")
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, NLM_F_REQUEST | NLM_F_DUMP,
                             sequence, 0) + payload)
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


def read_interface(ifname: str, *, ipv6: bool = True, timeout: float = 1.0) -> InterfaceState:
    """The state of `ifname` as `ip -j [-4] address show dev IFNAME` reports it.

    Addresses as "ip/len"; an IPv6 address still in (or refused by) the kernel's DAD goes to
    `pending`. ipv6=False reads IPv4 only (`ip -4`).
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        index = None
        up = False
        mac = ""
        for mtype, body in _dump(sock, RTM_GETLINK, _IFINFOMSG.pack(0, 0, 0, 0, 0)):
            if mtype != RTM_NEWLINK or len(body) < _IFINFOMSG.size:
                continue
            attributes = _attributes(body[_IFINFOMSG.size:])
            if attributes.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace") != ifname:
                continue
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body)
            up = bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)
            mac = ":".join(f"{byte:02x}" for byte in attributes.get(IFLA_ADDRESS, b""))
        if index is None:
            return InterfaceState(False, False, "", ())
        family = socket.AF_UNSPEC if ipv6 else socket.AF_INET
        usable: list[str] = []
        pending: list[str] = []
        for mtype, body in _dump(sock, RTM_GETADDR, _IFADDRMSG.pack(family, 0, 0, 0, 0)):
            if mtype != RTM_NEWADDR or len(body) < _IFADDRMSG.size:
                continue
            address_family, prefixlen, flags, _scope, address_index = _IFADDRMSG.unpack_from(body)
            if address_index != index or address_family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if not ipv6 and address_family != socket.AF_INET:
                continue
            attributes = _attributes(body[_IFADDRMSG.size:])
            raw = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
            if raw is None:
                continue
            if IFA_FLAGS in attributes and len(attributes[IFA_FLAGS]) >= 4:
                flags = struct.unpack_from("=I", attributes[IFA_FLAGS])[0]
            text = f"{ipaddress.ip_address(raw)}/{prefixlen}"
            waiting = flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
            (pending if waiting else usable).append(text)
        return InterfaceState(True, up, mac, tuple(usable), tuple(pending))


RTM_DELADDR = 21
NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x4, 0x200, 0x400
IFA_CACHEINFO = 6
IFA_F_NODAD = 0x02
_CACHEINFO = struct.Struct("=IIII")
FOREVER = 0xFFFFFFFF


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
    request = NLM_F_REQUEST | NLM_F_ACK | ((NLM_F_CREATE | NLM_F_EXCL) if add else 0)
    sequence = int.from_bytes(os.urandom(4), "little")
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, request, sequence, 0)
                  + body)
        while True:
            data = sock.recv(_MAX_REPLY)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise OSError("rtnetlink: malformed reply")
                reply = data[offset + _NLMSGHDR.size:offset + length]
                offset += _align4(length)
                if seq == sequence and mtype == NLMSG_ERROR:
                    error = -struct.unpack_from("=i", reply)[0]
                    if error:
                        raise OSError(error, f"rtnetlink: {os.strerror(error)}")
                    return
            if not data:
                raise OSError("rtnetlink: empty reply")
