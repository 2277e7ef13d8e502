"""Reading the lab without changing it: addresses over rtnetlink and the VIP sampler."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from lab.procs import _ip
from lab.settings import ARPING, CLIENT_IP, INTERFACE, VIP_IP, LabError, Node

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_IFNAME, IFLA_OPERSTATE = 3, 16
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
IF_OPER_DOWN, IF_OPER_LOWERLAYERDOWN = 2, 3
_NLMSGHDR = struct.Struct("=LHHLL")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _rtattrs(data: bytes) -> dict[int, bytes]:
    """Route attributes (type -> payload) of one netlink message body."""
    attrs: dict[int, bytes] = {}
    off = 0
    while off + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, off)
        if length < _RTATTR.size:
            break
        attrs.setdefault(kind, data[off + _RTATTR.size : off + length])
        off += _align4(length)
    return attrs


def _same_ip(a: str, b: str) -> bool:
    """One address however spelled (2001:DB8::1 and 2001:db8:0::1 are the same)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _netlink_socket_in(netns: str) -> socket.socket:
    """An rtnetlink socket that lives in network namespace `netns`.

    A socket stays in the namespace it was created in, so a throw-away thread
    enters the namespace (setns affects only the calling thread), opens it and ends.
    """
    box: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            sock.bind((0, 0))
            box.append(sock)
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=work, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if not box:
        raise LabError(f"{netns}: opening a netlink socket failed silently")
    if isinstance(box[0], BaseException):
        raise LabError(f"{netns}: cannot open a netlink socket: {box[0]}") from box[0]
    return box[0]


class NetnsReader:
    """Reads one interface's carrier and addresses in a namespace over rtnetlink.

    Why: a fork+exec of `ip` per namespace and sample takes tens of milliseconds on a
    loaded box; two netlink dumps on a socket opened once take well under one. Errors
    raise (OSError, LabError): a sampler must never read a failure as "no address".
    """

    def __init__(self, netns: str, timeout: float = 1.0) -> None:
        self.netns = netns
        self._sock = _netlink_socket_in(netns)
        self._sock.settimeout(timeout)
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the socket (it keeps the namespace alive while open)."""
        with self._lock:
            self._sock.close()

    def _dump(self, kind: int, payload: bytes) -> list[tuple[int, bytes]]:
        """Send one dump request and return its (type, body) replies."""
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            seq = self._seq
            header = _NLMSGHDR.pack(
                _NLMSGHDR.size + len(payload), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
            )
            self._sock.send(header + payload)
            out: list[tuple[int, bytes]] = []
            while True:
                data = self._sock.recv(1 << 16)
                off = 0
                while off + _NLMSGHDR.size <= len(data):
                    length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                    if length < _NLMSGHDR.size:
                        raise LabError(f"{self.netns}: malformed netlink reply")
                    body = data[off + _NLMSGHDR.size : off + length]
                    off += _align4(length)
                    if mseq != seq:
                        continue  # a late reply to an earlier, timed-out request
                    if mtype == NLMSG_DONE:
                        return out
                    if mtype == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", body)[0]
                        if err:
                            raise OSError(err, f"{self.netns}: netlink: {os.strerror(err)}")
                        return out
                    out.append((mtype, body))

    def interface(self, ifname: str) -> tuple[bool, list[str]]:
        """(has carrier, usable addresses as 'ip/len') of `ifname`; LabError if absent.

        IPv4 and IPv6; an IPv6 address still in (or refused by) the kernel's DAD answers
        nothing on the wire, so it is left out.
        """
        index = None
        carrier = False
        for mtype, body in self._dump(RTM_GETLINK, _IFINFOMSG.pack(0, 0, 0, 0, 0)):
            if mtype != RTM_NEWLINK or len(body) < _IFINFOMSG.size:
                continue
            attrs = _rtattrs(body[_IFINFOMSG.size :])
            if attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode() != ifname:
                continue
            index = _IFINFOMSG.unpack_from(body)[2]
            oper = attrs.get(IFLA_OPERSTATE, b"\0")[0]
            carrier = oper not in (IF_OPER_DOWN, IF_OPER_LOWERLAYERDOWN)
        if index is None:
            raise LabError(f"{self.netns}: no interface {ifname}")
        addrs: list[str] = []
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        for mtype, body in self._dump(RTM_GETADDR, request):
            if mtype != RTM_NEWADDR or len(body) < _IFADDRMSG.size:
                continue
            family, prefixlen, flags, _scope, idx = _IFADDRMSG.unpack_from(body)
            if family not in (socket.AF_INET, socket.AF_INET6) or idx != index:
                continue
            attrs = _rtattrs(body[_IFADDRMSG.size :])
            extended = attrs.get(IFA_FLAGS)
            if extended is not None and len(extended) == 4:
                flags = struct.unpack("=I", extended)[0]
            if family == socket.AF_INET6 and flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                continue
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            size = 4 if family == socket.AF_INET else 16
            if raw is not None and len(raw) == size:
                addrs.append(f"{socket.inet_ntop(family, raw)}/{prefixlen}")
        return carrier, addrs


class VipSampler:
    """Samples lab.vip_holders() every ~50 ms in a thread: catches even brief double VIPs.

    Use as a context manager around a scenario, then call assert_never_two(). A sampler
    that could not look proves nothing: any sampling error, no samples at all, or a gap
    over `max_gap` between two samples fails assert_sound() (and so assert_never_two()).
    """

    def __init__(
        self, lab: Any, interval: float = 0.05, ip: str = VIP_IP, max_gap: float = 0.2
    ) -> None:
        self.lab = lab
        self.interval = interval
        self.ip = ip
        self.max_gap = max_gap
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start sampling in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="vip-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (takes one last sample first)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        self.sample()

    def sample(self) -> tuple[str, ...]:
        """Take one sample now."""
        t = time.monotonic()
        try:
            holders = tuple(self.lab.vip_holders(self.ip))
        except Exception as exc:
            with self._lock:
                self.errors.append((t, repr(exc)))
            return ()
        with self._lock:
            self.samples.append((t, holders))
        return holders

    def _loop(self) -> None:
        """Sample until stopped."""
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    @property
    def max_holders(self) -> int:
        """Largest number of simultaneous holders seen."""
        with self._lock:
            return max((len(h) for _, h in self.samples), default=0)

    @property
    def last(self) -> tuple[str, ...]:
        """Holders in the latest sample."""
        with self._lock:
            return self.samples[-1][1] if self.samples else ()

    def transitions(self) -> list[tuple[float, tuple[str, ...]]]:
        """Samples where the holder set changed (time relative to the first sample)."""
        with self._lock:
            samples = list(self.samples)
        out: list[tuple[float, tuple[str, ...]]] = []
        prev: tuple[str, ...] | None = None
        t0 = samples[0][0] if samples else 0.0
        for t, holders in samples:
            if holders != prev:
                out.append((round(t - t0, 3), holders))
                prev = holders
        return out

    def first_time(self, predicate: Callable[[tuple[str, ...]], bool]) -> float | None:
        """Monotonic time of the first sample satisfying predicate."""
        with self._lock:
            return next((t for t, h in self.samples if predicate(h)), None)

    def periods(self) -> list[float]:
        """Seconds between consecutive samples."""
        with self._lock:
            times = [t for t, _ in self.samples]
        return [b - a for a, b in itertools.pairwise(times)]

    def period_stats(self) -> dict[str, float]:
        """count, median, p99 and max of the sample period in ms (for reports)."""
        periods = sorted(self.periods())
        if not periods:
            return {"count": 0}

        def pick(q: float) -> float:
            return round(1000 * periods[min(len(periods) - 1, int(q * len(periods)))], 1)

        return {"count": len(periods) + 1, "median_ms": pick(0.5), "p99_ms": pick(0.99),
                "max_ms": round(1000 * periods[-1], 1)}

    def assert_sound(self) -> None:
        """AssertionError unless the samples prove something: no errors, some samples,
        no gap over max_gap between two of them."""
        with self._lock:
            errors = list(self.errors)
            samples = list(self.samples)
        if errors:
            t0 = samples[0][0] if samples else errors[0][0]
            shown = "; ".join(f"+{t - t0:.2f}s {e}" for t, e in errors[:5])
            raise AssertionError(f"VIP sampler failed {len(errors)} times: {shown}")
        if not samples:
            raise AssertionError("VIP sampler took no samples: it proves nothing")
        t0 = samples[0][0]
        gaps = [
            (a - t0, b - a)
            for (a, _), (b, _) in itertools.pairwise(samples)
            if b - a > self.max_gap
        ]
        if gaps:
            shown = ", ".join(f"+{t:.2f}s: {g * 1000:.0f} ms" for t, g in gaps[:10])
            raise AssertionError(
                f"VIP sampler left {len(gaps)} gaps over {self.max_gap * 1000:.0f} ms "
                f"between samples (a double VIP could hide there): {shown}"
            )

    def assert_never_two(self) -> None:
        """AssertionError listing the samples where two or more nodes held the VIP,
        or when the sampling itself is unsound (see assert_sound)."""
        with self._lock:
            bad = [(t, h) for t, h in self.samples if len(h) > 1]
            t0 = self.samples[0][0] if self.samples else 0.0
            count = len(self.samples)
        if bad:
            shown = ", ".join(f"+{t - t0:.2f}s {list(h)}" for t, h in bad[:20])
            raise AssertionError(
                f"VIP {self.ip} held by more than one node in {len(bad)} of {count} "
                f"samples: {shown}; transitions: {self.transitions()}"
            )
        self.assert_sound()


class ObserveMixin:
    """What a test reads from the lab: addresses, holders, neighbour entries (methods of Lab)."""

    def _link_json(self, ns: str, *args: str) -> list[dict[str, Any]]:
        """`ip -n NS -j addr show dev eth0` and friends, parsed."""
        res = _ip("-n", ns, "-j", *args, check=False, timeout=5)
        if res.returncode != 0 or not res.stdout.strip():
            return []
        data = json.loads(res.stdout)
        return data if isinstance(data, list) else []

    def addresses(self, node: Node) -> list[str]:
        """IPv4 addresses on the node's eth0 as 'a.b.c.d/len'."""
        out: list[str] = []
        for link in self._link_json(node.netns, "-4", "addr", "show", "dev", INTERFACE):
            for info in link.get("addr_info", []):
                if info.get("family") == "inet":
                    out.append(f"{info['local']}/{info['prefixlen']}")
        return out

    def has_carrier(self, node: Node) -> bool:
        """eth0 is up and plugged in (operstate not DOWN/LOWERLAYERDOWN)."""
        links = self._link_json(node.netns, "link", "show", "dev", INTERFACE)
        return bool(links) and links[0].get("operstate") not in ("DOWN", "LOWERLAYERDOWN")

    def _reader(self, node: Node) -> NetnsReader:
        """The node's netlink reader, opened on first use and closed by down()."""
        with self._readers_lock:
            reader = self._readers.get(node.netns)
            if reader is None:
                reader = self._readers[node.netns] = NetnsReader(node.netns)
            return reader

    def _close_readers(self) -> None:
        """Close every netlink socket: an open one would keep its namespace alive."""
        with self._readers_lock:
            readers = list(self._readers.values())
            self._readers.clear()
        for reader in readers:
            with contextlib.suppress(OSError):
                reader.close()

    def vip_holders(self, ip: str = VIP_IP) -> list[str]:
        """Nodes with `ip` on an eth0 that has carrier: the ones that could collide.

        Read over netlink (cheap enough for a 50 ms sampler); raises when a node
        cannot be read, never answers "nobody" for "could not look".
        """
        holders: list[str] = []
        for n in self.all_nodes:
            carrier, addrs = self._reader(n).interface(INTERFACE)
            if carrier and any(_same_ip(a.split("/", 1)[0], ip) for a in addrs):
                holders.append(n.name)
        return holders

    def client_arping(self, ip: str = VIP_IP, count: int = 1, timeout: float = 1.0) -> list[str]:
        """MACs (lower case, distinct, in reply order) that answer ARP for ip at the client.

        iputils arping stops once `count` replies arrived: use count >= 2 to see
        a second responder (a duplicate VIP); vip_holders() is the exact check.
        """
        res = self.run(
            None,
            [ARPING, "-I", INTERFACE, "-c", str(count), "-w", f"{timeout:g}", ip],
            user="root",
            check=False,
            timeout=timeout + 5,
        )
        macs: list[str] = []
        for m in re.finditer(r"reply from \S+ \[([0-9A-Fa-f:]{17})\]", res.stdout):
            mac = m.group(1).lower()
            if mac not in macs:
                macs.append(mac)
        return macs

    def client_neigh_mac(self, ip: str = VIP_IP) -> str | None:
        """The MAC the client's neighbour table holds for ip (None if none/failed)."""
        for entry in self._link_json(self.client_ns, "neigh", "show", "to", ip):
            mac = entry.get("lladdr")
            if entry.get("dst") == ip and isinstance(mac, str):
                return mac.lower()
        return None

    def node_by_mac(self, mac: str) -> Node | None:
        """Which node owns a MAC (for readable assertions)."""
        return next((n for n in self.all_nodes if n.mac == mac.lower()), None)

    def diagnostics(self, lines: int = 30) -> str:
        """Log tails and node states, for a failing test's report."""
        parts = [f"lab {self.prefix} workdir {self.workdir}"]
        for n in self.all_nodes:
            state = "?"
            if n.datadir.exists():
                rec = self.is_in_recovery(n)
                state = {True: "standby", False: "primary", None: "down"}[rec]
            parts.append(
                f"== {n.name} ({n.netns} {n.ip}) pg={state} addrs={self.addresses(n)} "
                f"carrier={self.has_carrier(n)} repmgrd={self.repmgrd_pid(n)}"
            )
            extra = (n.dir / "repmgr-vip.log", n.dir / "repmgr-vip-daemon.json")
            for f in (n.repmgr_log, n.pg_log, n.dir / "sshd.log", n.dir / "repmgrd.stdout", *extra):
                if f.exists():
                    tail = f.read_text(errors="replace").splitlines()[-lines:]
                    if tail:
                        parts.append(f"-- {f.name} --")
                        parts.extend(tail)
        return "\n".join(parts)

    def _safe_diagnostics(self) -> str:
        """diagnostics() that never raises (used while handling another error)."""
        try:
            return self.diagnostics(lines=15)
        except Exception as exc:
            return f"(no diagnostics: {exc!r})"

    def node_table(self) -> str:
        """Human-readable node list for the CLI."""
        rows = [f"{'name':8} {'id':>3} {'netns':10} {'ip':12} {'mac':17} dir"]
        for n in self.all_nodes:
            rows.append(f"{n.name:8} {n.node_id:>3} {n.netns:10} {n.ip:12} {n.mac:17} {n.dir}")
        rows.append(
            f"{'client':8} {'':>3} {self.client_ns:10} {CLIENT_IP:12} {self.client_mac:17} -"
        )
        return "\n".join(rows)
