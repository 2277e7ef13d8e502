"""IPv6 neighbour discovery for the VIP on a raw packet socket (needs CAP_NET_RAW).

The IPv6 twin of arp.py. A probe is duplicate address detection (RFC 4862 5.4): a neighbour
solicitation for the address from the unspecified address to its solicited-node multicast
group; any neighbour advertisement for it from another MAC means another host holds it. The
announcement is an unsolicited neighbour advertisement to all nodes with the override flag
and our link-layer address (RFC 4861 7.2.6), so neighbours replace a cached old MAC at once.

Without the capability (hooks through sudo) no exact command line sends these packets; there
the kernel's own DAD is the probe and its `ndisc_notify` advertisement is the announcement
(see `kernel_dad_problems` and network.py).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repmgr_vip.adapters.arp import (
    helper_target,
    interface_mac,
    internet_checksum,
    mac_text,
    packet_socket,
    send_frames,
    solicit,
)
from repmgr_vip.core.errors import ConfigError

if TYPE_CHECKING:
    from repmgr_vip.core.model import CheckResult

ETH_P_IPV6 = 0x86DD
IPPROTO_ICMPV6 = 58
NEIGHBOR_SOLICITATION = 135
NEIGHBOR_ADVERTISEMENT = 136
OPT_TARGET_LLADDR = 2
FLAG_OVERRIDE = 0x20
HOP_LIMIT = 255  # RFC 4861: receivers drop ND packets with any other hop limit
ALL_NODES = ipaddress.IPv6Address("ff02::1")
UNSPECIFIED = ipaddress.IPv6Address("::")
PACKET_OUTGOING = 4


def solicited_node(address: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    """ff02::1:ffXX:XXXX, the group that a holder of `address` listens on."""
    return ipaddress.IPv6Address(b"\xff\x02" + b"\x00" * 9 + b"\x01\xff" + address.packed[13:])


def multicast_mac(group: ipaddress.IPv6Address) -> bytes:
    """33:33 followed by the group's last four bytes (RFC 2464 7)."""
    return b"\x33\x33" + group.packed[12:]


def checksum(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, message: bytes) -> int:
    """The ICMPv6 checksum over the IPv6 pseudo-header and the message (RFC 4443 2.3)."""
    data = src.packed + dst.packed + struct.pack("!I3xB", len(message), IPPROTO_ICMPV6) + message
    return internet_checksum(data)


def _frame(src_mac: bytes, dst_mac: bytes, src: ipaddress.IPv6Address,
           dst: ipaddress.IPv6Address, icmp_type: int, body: bytes) -> bytes:
    message = struct.pack("!BBH", icmp_type, 0, 0) + body
    message = message[:2] + struct.pack("!H", checksum(src, dst, message)) + message[4:]
    ipv6 = struct.pack("!IHBB", 6 << 28, len(message), IPPROTO_ICMPV6, HOP_LIMIT)
    ethernet = dst_mac + src_mac + struct.pack("!H", ETH_P_IPV6)
    return ethernet + ipv6 + src.packed + dst.packed + message


def solicitation_frame(src_mac: bytes, target: ipaddress.IPv6Address) -> bytes:
    """A DAD probe: NS for `target` from :: to its solicited-node group, no options."""
    group = solicited_node(target)
    return _frame(src_mac, multicast_mac(group), UNSPECIFIED, group, NEIGHBOR_SOLICITATION,
                  b"\x00" * 4 + target.packed)


def advertisement_frame(src_mac: bytes, address: ipaddress.IPv6Address) -> bytes:
    """An unsolicited NA: override set, solicited and router clear, our MAC as an option."""
    body = (struct.pack("!B3x", FLAG_OVERRIDE) + address.packed
            + struct.pack("!BB", OPT_TARGET_LLADDR, 1) + src_mac)
    return _frame(src_mac, multicast_mac(ALL_NODES), address, ALL_NODES,
                  NEIGHBOR_ADVERTISEMENT, body)


def parse_nd(frame: bytes) -> tuple[int, bytes, ipaddress.IPv6Address, bytes | None] | None:
    """(ICMPv6 type, Ethernet source, target, target link-layer address option) of a valid
    neighbour solicitation or advertisement; None for anything else or a bad checksum."""
    if len(frame) < 14 + 40 + 24 or frame[12:14] != struct.pack("!H", ETH_P_IPV6):
        return None
    ip = frame[14:54]
    if ip[0] >> 4 != 6 or ip[6] != IPPROTO_ICMPV6 or ip[7] != HOP_LIMIT:
        return None
    length = struct.unpack("!H", ip[4:6])[0]
    message = frame[54:54 + length]
    if len(message) != length or length < 24 or message[1] != 0:
        return None
    if message[0] not in (NEIGHBOR_SOLICITATION, NEIGHBOR_ADVERTISEMENT):
        return None
    src = ipaddress.IPv6Address(ip[8:24])
    dst = ipaddress.IPv6Address(ip[24:40])
    if checksum(src, dst, message) != 0:
        return None
    lladdr: bytes | None = None
    options = message[24:]
    while len(options) >= 8:
        kind, units = options[0], options[1]
        if units == 0:
            return None  # RFC 4861 4.6: a zero-length option makes the packet invalid
        if kind == OPT_TARGET_LLADDR and units == 1:
            lladdr = options[2:8]
        options = options[units * 8:]
    return message[0], frame[6:12], ipaddress.IPv6Address(message[8:24]), lladdr


def _open(interface: str, program: list[tuple[int, int, int, int]] | None = None
          ) -> socket.socket:
    return packet_socket(interface, ETH_P_IPV6, program)


def advertisement_filter(target: ipaddress.IPv6Address) -> list[tuple[int, int, int, int]]:
    """A BPF program passing only neighbour advertisements for `target` (what probe judges):
    the socket would otherwise see every IPv6 frame on the LAN for the probe's window."""
    from repmgr_vip.adapters import bpf

    return bpf.assemble([
        bpf.Check(12, bpf.HALF, ETH_P_IPV6), bpf.Check(20, bpf.BYTE, IPPROTO_ICMPV6),
        bpf.Check(21, bpf.BYTE, HOP_LIMIT), bpf.Check(54, bpf.BYTE, NEIGHBOR_ADVERTISEMENT),
        *bpf.equal(62, target.packed)])  # the advertised target address


def probe(interface: str, address: str, count: int, wait: float,
          complete: bool = False) -> tuple[str, ...]:
    """MACs of other hosts that advertise `address`, answering our DAD solicitations
    (`complete`: all of them within `wait`, not only the first)."""
    own = interface_mac(interface)
    target = ipaddress.IPv6Address(address)
    frame = solicitation_frame(own, target)

    def judge(data: bytes, where: Any) -> tuple[str, bool] | None:
        if len(where) > 2 and where[2] == PACKET_OUTGOING:
            return None  # our own frames, and our kernel's answers to others
        parsed = parse_nd(data)
        if parsed is None:
            return None
        kind, eth_src, got, lladdr = parsed
        mac = lladdr or eth_src
        if kind != NEIGHBOR_ADVERTISEMENT or got != target or own in (mac, eth_src):
            return None
        return mac_text(mac), True  # one advertisement proves it is in use

    with _open(interface, advertisement_filter(target)) as sock:
        return solicit(sock, frame, count, wait, judge, complete=complete)


def announce_once(interface: str, address: str) -> None:
    """One unsolicited neighbour advertisement for `address` to all nodes."""
    own = interface_mac(interface)
    send_frames(interface, ETH_P_IPV6, advertisement_frame(own, ipaddress.IPv6Address(address)))


def _sysctl(path: str) -> int | None:
    try:
        return int(Path("/proc/sys/net/ipv6", path).read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def kernel_dad_problems(interface: str) -> list[str]:
    """Why the kernel cannot probe and announce an IPv6 VIP for sudo mode, with the fix.

    Through sudo the VIP is added without `nodad`: the kernel's DAD solicits from :: (the
    probe) and, with ndisc_notify, sends an unsolicited override advertisement when DAD
    completes (the announcement)."""
    problems = []
    conf = f"conf/{interface}"
    dad = max(_sysctl(f"{conf}/accept_dad") or 0, _sysctl("conf/all/accept_dad") or 0)
    if dad < 1 or (_sysctl(f"{conf}/dad_transmits") or 0) < 1:
        problems.append(f"the kernel does not run DAD on {interface}, so nothing probes an "
                        f"IPv6 VIP before it is added; set net.ipv6.conf.{interface}.accept_dad"
                        f"=1 and dad_transmits=1")
    if not (_sysctl(f"{conf}/ndisc_notify") or _sysctl("conf/all/ndisc_notify")):
        problems.append(f"the kernel does not announce a new IPv6 VIP on {interface}; set "
                        f"net.ipv6.conf.{interface}.ndisc_notify=1")
    return problems


def kernel_dad_seconds(interface: str) -> float:
    """How long the kernel's DAD can take: the random initial delay plus the probes."""
    delay = _sysctl(f"conf/{interface}/router_solicitation_delay")
    transmits = _sysctl(f"conf/{interface}/dad_transmits") or 1
    retrans = _sysctl(f"neigh/{interface}/retrans_time_ms") or 1000
    return (1.0 if delay is None else float(delay)) + transmits * retrans / 1000.0


def ipv6_checks(interface: str, mode: str, addresses: Sequence[str]) -> Iterator[CheckResult]:
    """`check`: how an IPv6 VIP is probed and announced in this privilege mode."""
    from repmgr_vip.core.model import CheckResult  # doctor imports the network layer

    if not addresses:
        return
    name = f"IPv6 {', '.join(addresses)}"
    if mode == "direct":
        yield CheckResult(name, True, "probed (DAD from ::) and announced (unsolicited NA) on "
                          "a packet socket; added with nodad")
        return
    problems = kernel_dad_problems(interface)
    for problem in problems:
        yield CheckResult(name, False, problem)
    if problems:
        return
    seconds = kernel_dad_seconds(interface)
    detail = (f"through sudo the kernel's DAD probes it and announces it (ndisc_notify) "
              f"within {seconds:.1f} s; `repmgr-vip nd-probe`/`nd-announce` (sudoers) probe "
              "a held address for conflicts and re-announce it")
    if seconds > 0.5:
        yield CheckResult(name, True, detail + f": every move waits for it; set net.ipv6.conf."
                          f"{interface}.router_solicitation_delay=0 and net.ipv6.neigh."
                          f"{interface}.retrans_time_ms=200 (or run the daemon and hooks in "
                          "direct mode)", warning=True)
        return
    yield CheckResult(name, True, detail)


# --- sudo mode: the same probe and announcement through exact command lines -------------
#
# In sudo mode the daemon and the hooks run as postgres, without CAP_NET_RAW. The kernel's DAD
# probes an IPv6 address when it is added and announces it once, but nothing would probe a
# held address for a conflict or re-announce it. So `repmgr-vip nd-probe IF ADDR COUNT WAIT`
# and `repmgr-vip nd-announce IF ADDR COUNT INTERVAL` run these very functions as root, each
# through a sudoers rule for that exact command line (`repmgr-vip sudoers`): no argument is
# free, no configuration or environment is read, so the rule lets postgres do exactly one
# thing. `check` verifies that nobody but root can change the program those rules run.

HELPER_PROBE = "nd-probe"
HELPER_ANNOUNCE = "nd-announce"
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08


def usable_on(interface: str, address: str,
              table: Path = Path("/proc/net/if_inet6")) -> bool:
    """Whether `address` is on `interface` and usable (not tentative, DAD not failed), from
    /proc/net/if_inet6: no subprocess, nothing a caller controls."""
    want = ipaddress.IPv6Address(address).packed.hex()
    try:
        lines = table.read_text(encoding="ascii").splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[0] == want and fields[5] == interface:
            return not int(fields[4], 16) & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
    return False


def helper_args(interface: str, address: str, count: str, seconds: str
                ) -> tuple[str, str, int, float]:
    """The helper's four arguments, checked as strictly as the config checks them."""
    name, ip = helper_target(interface, address, version=6)
    if not (count.isascii() and count.isdigit() and 1 <= int(count) <= 100):
        raise ConfigError(f"count {count!r} must be 1..100")
    try:
        wait = float(seconds)
    except ValueError as exc:
        raise ConfigError(f"{seconds!r} is not a number of seconds") from exc
    if not 0 <= wait <= 60:
        raise ConfigError(f"{seconds!r} must be 0..60 seconds")
    return name, ip, int(count), wait


def helper_probe(interface: str, address: str, count: str, wait: str) -> list[str]:
    """nd-probe: the MACs of other hosts answering for the address (one per line)."""
    name, ip, times, seconds = helper_args(interface, address, count, wait)
    return list(probe(name, ip, times, seconds))


def helper_announce(interface: str, address: str, count: str, interval: str) -> int:
    """nd-announce: `count` unsolicited advertisements `interval` apart, each only while the
    address is still usable here (never advertise an address given up meanwhile)."""
    import time

    name, ip, times, seconds = helper_args(interface, address, count, interval)
    sent = 0
    for index in range(times):
        if index:
            time.sleep(seconds)
        if not usable_on(name, ip):
            break
        announce_once(name, ip)
        sent += 1
    return sent
