"""After a release: refuse, with a TCP reset, the connections clients still send to our MAC.

A client's ARP cache keeps the old holder's MAC until the new holder's gratuitous ARP
arrives. Between our release and that moment, the SYNs it sends to the VIP reach this host,
whose kernel drops them (the address is no longer local), and each waits its connect timeout
or the retransmission (1 s, then 3 s, 7 s) before trying again, while the VIP is already up
elsewhere a millisecond later. Before the release the kernel refused them itself (the dead
primary's port has no listener). So for a short while after a peer's release, this host
answers SYNs to the VIP that arrive at its own MAC as the kernel answers a closed port:
RST|ACK, acknowledging the SYN. The client's next attempt finds the new holder.

Only SYNs (no established connection is touched), only to the VIP, only at our MAC, only
from the release on, only while the VIP is not here, only for REFUSE_FOR
seconds: the address was just moved and the peer's hold keeps this node from adding it back
for longer than that (decide: release_request_hold). IPv4 and IPv6 (a SYN whose next header
is TCP itself; extension headers are left alone). Needs CAP_NET_RAW: the daemon in direct
mode has it; in sudo mode (the `release` a peer runs over ssh, as postgres) the same Refuser
runs as root in `repmgr-vip refuse-stale`, through an exact sudoers line (see the helper
below).
"""

from __future__ import annotations

import functools
import ipaddress
import select
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING

from repmgr_vip.adapters import bpf
from repmgr_vip.adapters.arp import (
    READY,
    helper_main,
    helper_target,
    interface_mac,
    internet_checksum,
    packet_socket,
)
from repmgr_vip.core.errors import CommandFailed

if TYPE_CHECKING:  # the root helper imports this module while a release waits for it:
    import subprocess  # subprocess, the process runner and logging load only where used

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
TCP = 6
HOP_LIMIT = 64  # Linux's default for both families
SYN, RST, ACK = 0x02, 0x04, 0x10
REFUSE_FOR = 2.0  # seconds: clients' caches follow the new holder's announcement long before
CHECK_EVERY = 0.1  # how often the VIP's absence is checked again


def reset_for(frame: bytes, own_mac: bytes, vip: bytes) -> bytes | None:
    """The RST|ACK frame answering `frame` if it is a TCP SYN to `vip` (4 bytes: IPv4, 16:
    IPv6) at `own_mac`, else None. As a Linux kernel answers a SYN to a closed port: seq 0,
    ack = SYN's seq + 1."""
    if len(vip) == 16:
        return _reset_v6(frame, own_mac, vip)
    if len(frame) < 14 + 20 or frame[0:6] != own_mac or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    version, ihl = ip[0] >> 4, (ip[0] & 0x0F) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    fragment = struct.unpack("!H", ip[6:8])[0] & 0x3FFF  # MF flag or an offset
    if version != 4 or ihl < 20 or ip[9] != TCP or ip[16:20] != vip or fragment:
        return None
    if total > len(ip) or total < ihl + 20:
        return None
    client_ip = ip[12:16]
    header = _tcp_reset(ip[ihl:total], lambda length: vip + client_ip + struct.pack(
        "!BBH", 0, TCP, length))
    if header is None:
        return None
    ip_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(header), 0, 0x4000, HOP_LIMIT,
                            TCP, 0, vip, client_ip)
    ip_header = ip_header[:10] + struct.pack("!H", internet_checksum(ip_header)) + ip_header[12:]
    ethernet = frame[6:12] + own_mac + b"\x08\x00"
    return (ethernet + ip_header + header).ljust(60, b"\x00")


def _reset_v6(frame: bytes, own_mac: bytes, vip: bytes) -> bytes | None:
    """reset_for an IPv6 frame: a fixed header whose next header is TCP, to `vip`."""
    if len(frame) < 14 + 40 or frame[0:6] != own_mac or frame[12:14] != b"\x86\xdd":
        return None
    ip = frame[14:]
    payload = struct.unpack("!H", ip[4:6])[0]
    if ip[0] >> 4 != 6 or ip[6] != TCP or ip[24:40] != vip or payload > len(ip) - 40:
        return None
    client_ip = ip[8:24]
    header = _tcp_reset(ip[40:40 + payload], lambda length: vip + client_ip + struct.pack(
        "!I3xB", length, TCP))
    if header is None:
        return None
    ip_header = struct.pack("!IHBB16s16s", 6 << 28, len(header), TCP, HOP_LIMIT, vip, client_ip)
    ethernet = frame[6:12] + own_mac + b"\x86\xdd"
    return ethernet + ip_header + header


def _tcp_reset(tcp: bytes, pseudo: Callable[[int], bytes]) -> bytes | None:
    """The RST|ACK TCP header answering the SYN segment `tcp` (None if it is not a bare SYN),
    its checksum over `pseudo(length)`, the family's pseudo-header."""
    if len(tcp) < 20 or tcp[13] & (SYN | ACK | RST) != SYN:
        return None
    sport, dport, seq = struct.unpack("!HHI", tcp[0:8])
    data = len(tcp) - (tcp[12] >> 4) * 4
    header = struct.pack("!HHIIBBHHH", dport, sport, 0, (seq + 1 + max(data, 0)) & 0xFFFFFFFF,
                         5 << 4, RST | ACK, 0, 0, 0)
    checksum = internet_checksum(pseudo(len(header)) + header)
    return header[:16] + struct.pack("!H", checksum) + header[18:]


def syn_filter(own_mac: bytes, vip: bytes) -> list[tuple[int, int, int, int]]:
    """A BPF program passing only frames reset_for may answer: at our MAC, to the VIP, TCP,
    SYN without ACK or RST, IPv4 unfragmented (IPv6: TCP as the fixed header's next one)."""
    checks = bpf.equal(0, own_mac)
    syn = SYN | ACK | RST  # of these, SYN alone
    if len(vip) == 16:
        checks += [bpf.Check(12, bpf.HALF, ETH_P_IPV6), bpf.Check(14, bpf.BYTE, 0x60, 0xF0),
                   bpf.Check(20, bpf.BYTE, TCP), *bpf.equal(38, vip),
                   bpf.Check(14 + 40 + 13, bpf.BYTE, SYN, syn)]
    else:
        checks += [bpf.Check(12, bpf.HALF, ETH_P_IP), bpf.Check(14, bpf.BYTE, 0x40, 0xF0),
                   bpf.Check(23, bpf.BYTE, TCP), *bpf.equal(30, vip),
                   bpf.Check(20, bpf.HALF, none_of=0x3FFF),  # MF flag or an offset
                   bpf.Check(13, bpf.BYTE, SYN, syn, after_ipv4_header=True)]
    return bpf.assemble(checks)


class Refuser(threading.Thread):
    """Answers SYNs to the VIP at our MAC with a reset, for REFUSE_FOR seconds, while
    `released()` says the VIP is not here (checked every CHECK_EVERY seconds)."""

    def __init__(self, interface: str, address: str, released: Callable[[], bool],
                 seconds: float = REFUSE_FOR) -> None:
        super().__init__(daemon=True, name="refuse-stale-syn")
        self.interface = interface
        self.vip = ipaddress.ip_address(address).packed
        self.released = released
        self.seconds = seconds
        self.refused = 0  # how many SYNs it answered
        # created unhooked and bound once (arp.packet_socket): a socket created with the
        # protocol is unhooked again by bind(), which waits for an RCU grace period (10-20 ms
        # here), and this runs just before the old holder's release
        # the kernel passes on only the SYNs we answer (syn_filter): on a busy LAN, every
        # frame of the family would otherwise come up to Python for REFUSE_FOR seconds
        self.own_mac = interface_mac(interface)
        self.sock = packet_socket(interface, ETH_P_IPV6 if len(self.vip) == 16 else ETH_P_IP,
                                  syn_filter(self.own_mac, self.vip))
        self.examined = 0  # frames that reached Python

    def cancel(self) -> None:
        """Not started after all (the VIP was not here): the socket closes in the background
        (closing a packet socket waits for an RCU grace period, 10-20 ms)."""
        threading.Thread(target=self.sock.close, daemon=True, name="refuser-close").start()

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        checked = 0.0
        try:
            while (now := time.monotonic()) < deadline:
                if now - checked >= CHECK_EVERY:
                    if not self.released():
                        return
                    checked = now
                if not select.select([self.sock], [], [], min(CHECK_EVERY, deadline - now))[0]:
                    continue
                frame = self.sock.recv(2048)
                self.examined += 1
                answer = reset_for(frame, self.own_mac, self.vip)
                if answer is not None:
                    self.sock.send(answer)
                    self.refused += 1
        except OSError as exc:
            from repmgr_vip.adapters.log import LOG

            LOG.warning("refusing stale connections to the VIP stopped: %s", exc)
        finally:
            self.sock.close()


class Refusals:
    """One Refuser per address of the VIP (IPv4 and IPv6), started or cancelled together."""

    def __init__(self, refusers: Sequence[Refuser]) -> None:
        self.refusers = list(refusers)

    def start(self) -> None:
        for refuser in self.refusers:
            refuser.start()

    def cancel(self) -> None:
        for refuser in self.refusers:
            refuser.cancel()


def stale_refusal(interface: str, addresses: Sequence[str],
                  released: Callable[[str], bool]) -> Refusals | None:
    """Refusers with their sockets open, to start() once the VIP is gone: opened before the
    release, so no SYN slips through between the removal and the socket (one that came just
    before the removal gets the reset its kernel sent too, or one for a handshake the
    removal breaks anyway). `released(address)`: that address is no longer here. None when
    this process may not open a packet socket (no CAP_NET_RAW: the hooks through sudo) or
    the interface is gone."""
    refusers: list[Refuser] = []
    try:
        for address in addresses:
            refusers.append(Refuser(interface, address, functools.partial(released, address)))
    except OSError:
        Refusals(refusers).cancel()
        return None
    return Refusals(refusers) if refusers else None


# --- sudo mode: the same refusal as root, through an exact command line ------------------
#
# `repmgr-vip refuse-stale INTERFACE ADDRESS` (sudoers allows exactly that line for each
# address of the VIP) reads no configuration and no environment. It opens the Refuser's
# socket, says READY, and answers nothing until its caller writes GO on its stdin: the VIP
# is gone from this host. On end of file or anything else it ends without answering a frame.
# Its caller (VipNetwork.stale_refusal, sudo mode) waits for READY before the release, and
# the helper outlives the caller (ssh's remote command) by REFUSE_FOR seconds at most.

HELPER = "refuse-stale"
GO = "go"
GO_WAIT = 60.0  # the caller releases under the node's VIP lock (30 s at most), then says GO
HELPER_READY = 1.0  # seconds a caller waits for READY (sudo and Python start); then none
_STARTED: list[subprocess.Popen[str]] = []  # helpers of a long-lived caller, reaped later


def helper_refuse(interface: str, address: str, orders: IO[str], say: IO[str]) -> int:
    """refuse-stale: READY once the socket is open; then, told GO, refuses while the address
    stays away from the interface, REFUSE_FOR seconds at most. The SYNs refused."""
    name, ip = helper_target(interface, address)

    def released() -> bool:
        try:
            state = rtnl.read_interface(name, ipv6=":" in ip)
        except OSError:
            return False
        return state.present_as(ip) is None

    refuser = Refuser(name, ip, released)
    say.write(READY + "\n")
    say.flush()
    from repmgr_vip.adapters import rtnl  # while the caller releases, not before READY

    told = select.select([orders], [], [], GO_WAIT)[0]
    if not told or orders.readline().strip() != GO:
        refuser.sock.close()
        return 0
    refuser.run()
    return refuser.refused


def refuse_main(interface: str, address: str) -> int:
    """`repmgr-vip refuse-stale INTERFACE ADDRESS`: its exit code."""
    return helper_main(helper_refuse, interface, address, "refusing stale connections")


class HelperRefusals:
    """stale_refusal through sudo: one `refuse-stale` helper per held address. launch()
    starts them, ready() waits until each has its socket open (said READY); then start()
    says GO to each, cancel() closes their stdin (end of file: they end)."""

    def __init__(self, helpers: Sequence[subprocess.Popen[str]]) -> None:
        self.helpers = list(helpers)

    @classmethod
    def launch(cls, commands: Sequence[Sequence[str]]) -> HelperRefusals | None:
        """The helpers under way (sudo and Python take about 100 ms); None if one cannot
        even start (logged)."""
        import subprocess

        from repmgr_vip.adapters.process import popen_text

        _STARTED[:] = [helper for helper in _STARTED if helper.poll() is None]  # reaps them
        refusal = cls([])
        try:
            for argv in commands:
                _STARTED.append(helper := popen_text(
                    argv, privileged=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, new_session=True))
                refusal.helpers.append(helper)
        except CommandFailed as exc:
            refusal._give_up(str(exc))
            return None
        return refusal

    def ready(self, within: float = HELPER_READY) -> bool:
        """Whether every helper said READY within `within` seconds; if not, they are ended
        (no sudo rule: sudo refuses at once) and the release goes on without a refusal, as
        without the capability."""
        from repmgr_vip.adapters.process import read_line

        deadline = time.monotonic() + within
        for helper in self.helpers:
            said = read_line(helper, deadline)
            if said != READY:
                self._give_up(f"{HELPER} said {said!r}" if said else
                              f"{HELPER} was not ready within {within:g} s")
                return False
        return True

    def start(self) -> None:
        for helper in self.helpers:
            _tell(helper, GO)

    def cancel(self) -> None:
        for helper in self.helpers:
            _tell(helper, "")

    def _give_up(self, why: str) -> None:
        from repmgr_vip.adapters.log import LOG

        LOG.warning("refusing stale connections to the VIP is not possible here: %s; check "
                    "`repmgr-vip check` (sudo rules)", why)
        for helper in self.helpers:
            _tell(helper, "")
            if helper.poll() is None:
                helper.terminate()  # sudo passes it on to a helper still starting


def _tell(helper: subprocess.Popen[str], order: str) -> None:
    """Writes the order (if any) and closes the helper's pipes: it never waits for more."""
    for pipe in (helper.stdin, helper.stdout):
        if pipe is None:
            continue
        try:
            if order and pipe is helper.stdin:
                pipe.write(order + "\n")
            pipe.close()
        except OSError:  # it ended already (killed, or sudo refused): nothing to tell
            pass


def refusal_through(commands: Sequence[Sequence[str]],
                    ready_within: float = HELPER_READY) -> HelperRefusals | None:
    """Starts the `refuse-stale` command lines (through sudo) and waits until each said
    READY; None if any cannot start or is not ready in time (see HelperRefusals.ready)."""
    refusal = HelperRefusals.launch(commands)
    return refusal if refusal is not None and refusal.ready(ready_within) else None
