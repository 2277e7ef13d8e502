"""The ideal mover: the baseline repmgr-vip is measured against (run as root in the client
namespace by bench/ideal.py).

It is what a VIP manager with no safety work at all could do at best: one kept connection per
node, `SELECT pg_is_in_recovery()` every 15 ms on each (one thread per node, so a dead host
never delays the others), and the instant a node other than the holder answers "not in
recovery", the address deleted on the old holder, added on the new one and a gratuitous ARP
sent from it, all on rtnetlink and packet sockets opened beforehand in every node's namespace
(no process to start: the move takes well under a millisecond). No fencing, no proof. Prints
one JSON line per event.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any

POLL = 0.015
CLONE_NEWNET = 0x40000000
ETH_P_ARP = 0x0806
ANNOUNCE = (0.0, 0.2, 0.4)  # seconds after the add
RTM_NEWADDR, RTM_DELADDR = 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL = 1, 2
# a dead link must end a query in about a second, not after TCP's retransmissions
KEEP = ("connect_timeout=1 tcp_user_timeout=1000 keepalives=1 keepalives_idle=1 "
        "keepalives_interval=1 keepalives_count=1")


def say(**record: Any) -> None:
    print(json.dumps({"t": time.time(), **record}), flush=True)


def sockets_in(netns: str, interface: str) -> tuple[socket.socket, socket.socket, int]:
    """An ARP packet socket on `interface` of namespace `netns`, an rtnetlink socket there and
    the interface's index (a socket stays in the namespace it was made in; a throw-away thread
    enters it, setns being per thread)."""
    box: list[tuple[socket.socket, socket.socket, int] | BaseException] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({netns})")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            sock.bind((interface, ETH_P_ARP))
            netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
            netlink.bind((0, 0))
            box.append((sock, netlink, socket.if_nametoindex(interface)))
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join()
    found = box[0]
    if isinstance(found, BaseException):
        raise found
    return found


def address_change(netlink: socket.socket, index: int, cidr: str, add: bool) -> None:
    """`ip address add|del CIDR dev INDEX` as one rtnetlink request (no process to start)."""
    ip, prefix = cidr.split("/")
    addr = ipaddress.IPv4Address(ip).packed
    attrs = b"".join(struct.pack("=HH", 8, kind) + addr for kind in (IFA_LOCAL, IFA_ADDRESS))
    body = struct.pack("=BBBBI", socket.AF_INET, int(prefix), 0, 0, index) + attrs
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if add else 0)
    header = struct.pack("=IHHII", 16 + len(body), RTM_NEWADDR if add else RTM_DELADDR,
                         flags, 1, 0)
    netlink.send(header + body)
    netlink.recv(4096)  # the acknowledgement (or an error: nothing to add or remove)


def garp(sock: socket.socket, ip: str) -> tuple[bytes, bytes]:
    """A gratuitous ARP request and reply for `ip` from the socket's interface."""
    mac: bytes = sock.getsockname()[4]
    addr = ipaddress.IPv4Address(ip).packed

    def frame(op: int, target_mac: bytes) -> bytes:
        eth = b"\xff" * 6 + mac + ETH_P_ARP.to_bytes(2, "big")
        arp = bytes.fromhex("00010800060400") + bytes([op]) + mac + addr + target_mac + addr
        return (eth + arp).ljust(60, b"\0")

    return frame(1, b"\0" * 6), frame(2, mac)


class Mover:
    def __init__(self, nodes: dict[str, tuple[str, str]], holder: str, vip: str,
                 interface: str, ip: str) -> None:
        self.nodes = nodes  # name -> (netns, conninfo)
        self.holder = holder
        self.vip, self.interface, self.ip = vip, interface, ip
        self.lock = threading.Lock()
        self.sockets = {name: sockets_in(netns, interface)
                        for name, (netns, _) in nodes.items()}

    def watch(self, name: str) -> None:
        import psycopg

        conninfo = f"{self.nodes[name][1]} {KEEP}"
        conn: Any = None
        while True:
            started = time.monotonic()
            try:
                if conn is None:
                    conn = psycopg.connect(conninfo, autocommit=True)
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and row[0] is False:
                    self.promoted(name)
            except Exception:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                time.sleep(0.2)  # backoff: a down node is retried five times a second
            time.sleep(max(0.0, POLL - (time.monotonic() - started)))

    def promoted(self, name: str) -> None:
        with self.lock:
            if name == self.holder:
                return
            old, self.holder = self.holder, name
            say(event="promotion_seen", node=name, old=old)
            _, netlink, index = self.sockets[old]
            address_change(netlink, index, self.vip, add=False)
            _, netlink, index = self.sockets[name]
            address_change(netlink, index, self.vip, add=True)
            frames = garp(self.sockets[name][0], self.ip)
            for delay in ANNOUNCE:
                threading.Timer(delay, self._send, args=(name, frames)).start()
            say(event="moved", node=name, old=old)

    def _send(self, name: str, frames: tuple[bytes, bytes]) -> None:
        with contextlib.suppress(OSError):
            for frame in frames:
                self.sockets[name][0].send(frame)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", action="append", default=[],
                        help="NAME=NETNS=CONNINFO, one per node")
    parser.add_argument("--holder", required=True, help="the node holding the VIP now")
    parser.add_argument("--vip", required=True, help="address/prefix")
    parser.add_argument("--interface", default="eth0")
    args = parser.parse_args()
    nodes = {}
    for spec in args.node:
        name, netns, conninfo = spec.split("=", 2)
        nodes[name] = (netns, conninfo)
    mover = Mover(nodes, args.holder, args.vip, args.interface, args.vip.split("/")[0])
    for name in nodes:
        threading.Thread(target=mover.watch, args=(name,), daemon=True).start()
    say(event="start", holder=args.holder)
    while True:
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
