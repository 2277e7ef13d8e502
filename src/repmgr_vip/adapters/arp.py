"""Gratuitous ARP and RFC 5227 probes on a raw packet socket (needs CAP_NET_RAW).

Used when this process already has the capability (root, or the systemd unit's ambient
capabilities). iputils arping counts time in whole seconds; here a probe listens for a
fraction of a second, which is what a LAN needs and what a fast handover wants.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from repmgr_vip.core.errors import ConfigError, ExitCode, VipError

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
REQUEST = 1
REPLY = 2

# The proof the daemon runs, fitted to a LAN. RFC 5227 (2.1.1) sends PROBE_NUM = 3 probes
# PROBE_MIN..PROBE_MAX (1-2 s) apart, then listens ANNOUNCE_WAIT (2 s): figures for any link
# a host may sit on, Wi-Fi and bridges included. Three probes stay (a lost frame or a lost
# answer is what they guard against); the spacing is cut to 20 ms and the last probe gets
# 40 ms of listening. A holder's kernel answers from its receive path: about 0.1 ms median,
# 2.9 ms at most in the lab on a loaded machine (bench/dark.py, `make bench`), so every probe
# is listened to for over 13 times the slowest answer seen, and a lost probe or answer leaves
# two more.
LAN_PROBES = 3
LAN_SPACING = 0.02
LAN_WINDOW = 0.08


def helper_target(interface: str, address: str, version: int | None = None
                  ) -> tuple[str, str]:
    """The interface and VIP address a root helper was given (sudo mode: `nd-probe`,
    `nd-announce`, `refuse-stale`), checked as strictly as the config checks them: the
    sudoers line fixes them, and a helper reads no configuration."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", interface):
        raise ConfigError(f"{interface!r} is not an interface name")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise ConfigError(f"{address!r} is not an IP address") from exc
    if version is not None and ip.version != version:
        raise ConfigError(f"{address!r} is not an IPv{version} address")
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
        raise ConfigError(f"{address!r} cannot be a VIP")
    return interface, str(ip)


def internet_checksum(data: bytes) -> int:
    """RFC 1071: the ones' complement of the ones' complement sum of 16-bit words (IPv4,
    TCP and ICMPv6 headers, each over its own bytes and pseudo-header)."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def interface_mac(interface: str) -> bytes:
    text = Path("/sys/class/net", interface, "address").read_text(encoding="ascii").strip()
    return bytes.fromhex(text.replace(":", ""))


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def arp_frame(op: int, src_mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes,
              dst_mac: bytes = BROADCAST) -> bytes:
    """An Ethernet + ARP frame, padded to the 60-byte Ethernet minimum."""
    ethernet = dst_mac + src_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + src_mac + sender_ip + target_mac + target_ip
    return (ethernet + arp).ljust(60, b"\x00")


def parse_arp(frame: bytes) -> tuple[int, bytes, bytes, bytes] | None:
    """(op, sender MAC, sender IP, target IP) of an ARP frame, or None."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_P_ARP):
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if (htype, ptype, hlen, plen) != (1, 0x0800, 6, 4):
        return None
    return op, frame[22:28], frame[28:32], frame[38:42]


def packet_socket(interface: str, protocol: int,
                  program: list[tuple[int, int, int, int]] | None = None) -> socket.socket:
    """A packet socket for `protocol` frames on `interface` only (and `program`'s, a BPF
    filter from adapters.bpf, attached before any frame can arrive).

    Created with protocol 0 it receives nothing; bind() then sets both the interface and
    the protocol. Created with the protocol it would queue frames from every interface
    until bound, and a probe could take another segment's answer for a conflict here.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        if program is not None:
            from repmgr_vip.adapters import bpf

            bpf.attach(sock, program)
        sock.bind((interface, protocol))
        _drain(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _open(interface: str) -> socket.socket:
    return packet_socket(interface, ETH_P_ARP)


def _drain(sock: socket.socket) -> None:
    """Discards anything queued before now (nothing is expected: belt and braces)."""
    while select.select([sock], [], [], 0)[0]:
        try:
            sock.recv(2048, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return


# judge(frame, address) -> (MAC of a host claiming the address, conclusive?) or None
Judge = Callable[[bytes, Any], "tuple[str, bool] | None"]


def solicit(sock: socket.socket, frame: bytes, count: int, wait: float,
            judge: Judge, spacing: float | None = None,
            complete: bool = False) -> tuple[str, ...]:
    """Sends `frame` `count` times, `spacing` apart (default: spread over `wait`), and
    listens until `wait` seconds after the first.

    Returns the MACs `judge` found in the answers; a conclusive answer ends it at once,
    unless `complete`: then every host that answers within `wait` is named.
    The one loop behind the ARP (RFC 5227), the LAN proof and the IPv6 (DAD) probe.
    """
    seen: dict[str, None] = {}
    if spacing is None:
        spacing = wait / max(count, 1)
    deadline = time.monotonic() + wait
    next_send = time.monotonic()
    sent = 0
    while True:
        now = time.monotonic()
        if sent < count and now >= next_send:
            sock.send(frame)
            sent += 1
            next_send = now + spacing
        if now >= deadline and sent >= count:
            break
        timeout = max(0.0, min(deadline, next_send if sent < count else deadline) - now)
        if not select.select([sock], [], [], timeout)[0]:
            continue
        verdict = judge(*sock.recvfrom(2048))
        if verdict is not None:
            seen[verdict[0]] = None
            if verdict[1] and not complete:
                break
    return tuple(seen)


def probe(interface: str, address: str, count: int, wait: float,
          spacing: float | None = None, complete: bool = False) -> tuple[str, ...]:
    """MACs of other hosts that claim `address`: RFC 5227 probes (sender IP 0.0.0.0)."""
    own = interface_mac(interface)
    target = ipaddress.IPv4Address(address).packed
    frame = arp_frame(REQUEST, own, b"\x00" * 4, ZERO_MAC, target)

    def judge(data: bytes, _where: Any) -> tuple[str, bool] | None:
        parsed = parse_arp(data)
        if parsed is None:
            return None
        op, sender_mac, sender_ip, _ = parsed
        if sender_ip != target or sender_mac == own or op not in (REQUEST, REPLY):
            return None
        return mac_text(sender_mac), op == REPLY  # one reply proves it is in use

    with _open(interface) as sock:
        return solicit(sock, frame, count, wait, judge, spacing, complete)


def lan_probe(interface: str, address: str, complete: bool = False) -> tuple[str, ...]:
    """The LAN proof: LAN_PROBES probes LAN_SPACING apart, listening LAN_WINDOW in all."""
    return probe(interface, address, LAN_PROBES, LAN_WINDOW, LAN_SPACING, complete)


_SENDERS: dict[int, socket.socket] = {}
_SENDERS_LOCK = threading.Lock()


def send_frames(interface: str, protocol: int, *frames: bytes) -> None:
    """Sends frames on `interface` through one packet socket kept for the process.

    Closing a packet socket waits for an RCU grace period in the kernel (synchronize_net:
    10-20 ms here), and an announcement is on a failover's critical path. The kept socket is
    created with protocol 0, so it is hooked to nothing and never receives anything.
    """
    with _SENDERS_LOCK:
        sock = _SENDERS.get(os.getpid())
        if sock is None:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
            _SENDERS.clear()  # a forked child does not use its parent's
            _SENDERS[os.getpid()] = sock
        for frame in frames:
            sock.sendto(frame, (interface, protocol))


def announce_once(interface: str, address: str) -> None:
    """One gratuitous ARP request and one reply, so both kinds of neighbours update."""
    own = interface_mac(interface)
    ip = ipaddress.IPv4Address(address).packed
    send_frames(interface, ETH_P_ARP, arp_frame(REQUEST, own, ip, ZERO_MAC, ip),
                arp_frame(REPLY, own, ip, own, ip))


# --- sudo mode: root helpers, each through an exact sudoers line ---------------------------
#
# A helper reads no configuration and no environment: its interface and address come from the
# sudoers line (helper_target checks them). It says READY once it can act, then takes orders,
# one line each, on its stdin, and ends at end of file: it never outlives its caller's pipe.

READY = "ready"
PROVER = "arp-prove"  # `repmgr-vip arp-prove IF ADDR`: the LAN proof for the hooks
PROVE = "probe"
SILENCE = "-"
PROVER_IDLE = 600.0  # seconds a prover waits for its next order before it ends anyway

Helper = Callable[[str, str, IO[str], IO[str]], int]


def helper_main(helper: Helper, interface: str, address: str, what: str) -> int:
    """Runs a helper on stdin/stdout: its exit code, a failure in one line on stderr."""
    import sys

    try:
        helper(interface, address, sys.stdin, sys.stdout)
    except VipError as exc:  # arguments the sudoers line should not have allowed
        print(f"repmgr-vip: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except OSError as exc:
        print(f"repmgr-vip: {what} failed: {exc.strerror or exc}", file=sys.stderr)
        return int(ExitCode.FAILED)
    return int(ExitCode.OK)


def helper_prove(interface: str, address: str, orders: IO[str], say: IO[str]) -> int:
    """arp-prove: READY, then for each PROVE order the LAN proof, complete (every MAC that
    answers within the window), as one line of MACs (SILENCE: none). The proofs given."""
    name, ip = helper_target(interface, address, version=4)
    interface_mac(name)  # no such interface: fail now, not at the first order
    say.write(READY + "\n")
    say.flush()
    proofs = 0
    while select.select([orders], [], [], PROVER_IDLE)[0]:
        if orders.readline().strip() != PROVE:
            break
        answered = lan_probe(name, ip, complete=True)
        say.write((" ".join(answered) or SILENCE) + "\n")
        say.flush()
        proofs += 1
    return proofs
