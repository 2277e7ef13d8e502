"""Who answers ARP for the VIP, seen from the client namespace, to the millisecond.

Run as root inside the lab's client namespace. It asks for the VIP every few milliseconds on a
raw AF_PACKET socket and prints one JSON line whenever the answering MAC changes (or answers
stop), so the benchmark can tell when clients could first reach the VIP on its new node.
Gratuitous ARPs (the new holder's announcements) count as answers too. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import sys
import time

ETH_P_ARP = 0x0806
PACKET_OUTGOING = 4
BROADCAST = b"\xff" * 6


def _request(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    """An Ethernet broadcast ARP request: who has target_ip? tell src_ip."""
    eth = BROADCAST + src_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src_mac + src_ip + b"\0" * 6 + target_ip
    return eth + arp


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interface", default="eth0")
    parser.add_argument("--ip", required=True, help="the VIP")
    parser.add_argument("--src-ip", required=True, help="this namespace's own address")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between requests")
    parser.add_argument("--silence", type=float, default=0.05,
                        help="report 'no answer' after this long without one")
    args = parser.parse_args()
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    sock.bind((args.interface, ETH_P_ARP))
    src_mac = sock.getsockname()[4]
    vip = socket.inet_aton(args.ip)
    frame = _request(src_mac, socket.inet_aton(args.src_ip), vip)
    current: str | None = None
    last_answer = 0.0
    next_send = time.monotonic()
    print(json.dumps({"t": time.time(), "event": "start", "interval": args.interval}), flush=True)
    while True:
        now = time.monotonic()
        if now >= next_send:
            sock.send(frame)
            next_send = now + args.interval
        if current is not None and now - last_answer > args.silence:
            wall = time.time()
            print(json.dumps({"t": wall, "mac": None, "op": "silence",
                              "last": wall - (now - last_answer)}), flush=True)
            current = None
        readable, _, _ = select.select([sock], [], [], max(0.0, next_send - time.monotonic()))
        if not readable:
            continue
        data, address = sock.recvfrom(128)
        seen = time.time()
        if address[2] == PACKET_OUTGOING or len(data) < 42:
            continue
        op = struct.unpack("!H", data[20:22])[0]
        sender_mac, sender_ip = data[22:28], data[28:32]
        if op not in (1, 2) or sender_ip != vip or sender_mac == src_mac:
            continue
        last_answer = time.monotonic()
        mac = _mac(sender_mac)
        if mac != current:
            kind = "reply" if op == 2 else "announce"
            print(json.dumps({"t": seen, "mac": mac, "op": kind}), flush=True)
            current = mac


if __name__ == "__main__":
    sys.exit(main())
