"""The VIP on the local interface: query, add, remove, announce (gratuitous ARP), probe.

A VIP may have an IPv4 and an IPv6 address (dual stack); every action covers all of them
and "holds" means holds all. IPv6 uses neighbour discovery (ndp.py) in direct mode; through
sudo the kernel's DAD probes and announces it (see `_add_v6_through_kernel`).

Every change is verified by reading the interface back, which makes each action idempotent:
adding a present address or removing an absent one is success. The privileged command lines
are built in one place (`PrivilegedCommands`) so that what runs and what `repmgr-vip sudoers`
allows can never drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import ipaddress
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from repmgr_vip.adapters import arp, ndp, rtnl, statefiles, tcpreset
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.privileges import effective_mode, privileged
from repmgr_vip.adapters.process import alive, describe, first_line, popen_text, run
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config, VipInterface
from repmgr_vip.core.errors import CommandFailed, RefusedError, VipError
from repmgr_vip.core.model import InterfaceState as InterfaceState  # re-exported
from repmgr_vip.core.model import ProbeResult as ProbeResult  # re-exported
from repmgr_vip.core.model import normal_ip

_SENT = re.compile(r"Sent (\d+) probe")
_REPLY = re.compile(r"reply from\s+\S+\s+\[([0-9A-Fa-f:]{17})\]", re.IGNORECASE)
QUERY_TIMEOUT = 5.0
CHANGE_TIMEOUT = 10.0
ANNOUNCE_FAILS_WITHIN = 0.1  # seconds in which `sudo arping -U` reports a failure, if ever


@dataclass(frozen=True)
class PrivilegedCommands:
    """The exact root command lines for one VIP; the single source for running and sudoers."""

    ip: str
    arping: str
    cidr: str
    address: str
    interface: str
    announce_count: int
    probe_count: int
    probe_timeout: float
    lease: int = 0  # the address's lifetime in whole seconds (vip.lease rounded up); 0: none
    version: int = 4
    others: tuple[PrivilegedCommands, ...] = ()  # the VIP's other addresses (dual stack)
    helper: str = ""  # repmgr-vip itself: IPv6 probe/announce through sudo (ndp.helper_*)
    announce_interval: float = 0.2

    @classmethod
    def from_config(cls, config: Config) -> PrivilegedCommands:
        """The first address's lines; `others` (and so `all()`) carries the rest."""
        first, *rest = [cls.for_address(config, a) for a in config.vip.all]
        return dataclasses.replace(first, others=tuple(rest))

    @classmethod
    def for_address(cls, config: Config, address: VipInterface) -> PrivilegedCommands:
        return cls(
            ip=config.commands.ip,
            arping=config.commands.arping,
            cidr=address.with_prefixlen,
            address=str(address.ip),
            interface=config.vip.interface,
            announce_count=config.vip.announce_count,
            probe_count=config.vip.probe_count,
            probe_timeout=config.vip.probe_timeout,
            lease=math.ceil(config.vip.lease),
            version=address.version,
            helper=config.remote.command,
            announce_interval=config.vip.announce_interval,
        )

    @property
    def family(self) -> str:
        return f"-{self.version}"

    def _lifetime(self) -> list[str]:
        if not self.lease:
            return []
        return ["valid_lft", str(self.lease), "preferred_lft", str(self.lease)]

    def add(self, *, nodad: bool = False) -> list[str]:
        """`nodad` (IPv6, direct mode) once our own probe proved the address free; through
        sudo the kernel's DAD is the probe, so sudoers allows only the line without it."""
        return [self.ip, self.family, "address", "add", self.cidr, "dev", self.interface,
                *self._lifetime(), *(["nodad"] if nodad and self.version == 6 else [])]

    def renew(self) -> list[str]:
        # IPv4 `change` (like `replace`) also creates a missing address: see lease.py
        return [self.ip, "-4", "address", "change", self.cidr, "dev", self.interface,
                *self._lifetime()]

    def delete(self) -> list[str]:
        return [self.ip, self.family, "address", "del", self.cidr, "dev", self.interface]

    def announce(self) -> list[str]:
        return [self.arping, "-U", "-c", str(self.announce_count), "-I", self.interface,
                self.address]

    def probe(self) -> list[str]:
        # iputils arping counts its deadline in whole seconds
        deadline = str(max(1, math.ceil(self.probe_timeout)))
        return [self.arping, "-D", "-c", str(self.probe_count), "-w", deadline,
                "-I", self.interface, self.address]

    def nd_probe(self) -> list[str]:
        """IPv6 through sudo: our DAD-style probe of a held address (conflicts), as root."""
        return [self.helper, ndp.HELPER_PROBE, self.interface, self.address,
                str(self.probe_count), f"{self.probe_timeout:g}"]

    def nd_announce(self) -> list[str]:
        """IPv6 through sudo: unsolicited advertisements after adding and on re-announce."""
        return [self.helper, ndp.HELPER_ANNOUNCE, self.interface, self.address,
                str(self.announce_count), f"{self.announce_interval:g}"]

    def arp_prove(self) -> list[str]:
        """IPv4 through sudo: the LAN proof (daemon.lan_proof) as root, one per order."""
        return [self.helper, arp.PROVER, self.interface, self.address]

    def refuse_stale(self) -> list[str]:
        """Through sudo: after a release to a peer, reset the SYNs still sent to our MAC."""
        return [self.helper, tcpreset.HELPER, self.interface, self.address]

    def all(self) -> list[list[str]]:
        """Every line sudo mode runs for the VIP: what `repmgr-vip sudoers` allows."""
        if self.version == 6:  # the kernel's DAD on add; our helper probes and announces
            own = [self.add(), self.delete(), self.nd_announce(), self.nd_probe()]
        else:
            leased = [self.renew()] if self.lease else []
            own = [self.add(), self.delete(), self.announce(), self.probe(), self.arp_prove(),
                   *leased]
        own.append(self.refuse_stale())
        return [*own, *(line for other in self.others for line in other.all())]


class RootProver:
    """Sudo mode's LAN proof for one IPv4 address: `sudo -n repmgr-vip arp-prove IF ADDR`,
    started at the first proof and asked for one proof per line while this process runs (a
    hook's fencing round asks again every 80 ms). Like the daemon's on its raw socket: three
    probes, every MAC that answers within 80 ms, instead of `arping -D`'s first answer within
    vip.probe_timeout (whole seconds for arping, stopped early) plus sudo each time. The
    helper ends at end of file: when this process closes it, or ends."""

    START_WITHIN = 2.0  # sudo and Python: about 50 ms
    ANSWER_WITHIN = 2.0  # the proof itself: 80 ms

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.child: subprocess.Popen[str] | None = None
        self.lock = threading.Lock()

    def probe(self) -> tuple[str, ...]:
        """Every MAC answering for the address; CommandFailed if the helper fails."""
        from repmgr_vip.adapters.process import read_line

        with self.lock:
            if self.child is None or self.child.poll() is not None:
                self._end()
                self.child = popen_text(self.argv, privileged=True, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        new_session=True)
                said = read_line(self.child, time.monotonic() + self.START_WITHIN)
                if said != arp.READY:
                    self._end()
                    raise CommandFailed(f"`{describe(self.argv)}` did not start ({said!r}); "
                                        "check `repmgr-vip check` (sudo rules)")
            child = self.child
            try:
                assert child.stdin is not None
                child.stdin.write(arp.PROVE + "\n")
                child.stdin.flush()
            except OSError as exc:
                self._end()
                raise CommandFailed(f"the ARP proof helper ended: {exc}") from exc
            answer = read_line(child, time.monotonic() + self.ANSWER_WITHIN)
            macs = tuple(answer.split()) if answer != arp.SILENCE else ()
            if not answer or not all(_MAC.fullmatch(mac) for mac in macs):
                self._end()
                raise CommandFailed(f"the ARP proof helper answered {answer!r}")
            return macs

    def close(self) -> None:
        with self.lock:
            self._end()

    def _end(self) -> None:
        child, self.child = self.child, None
        if child is None:
            return
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()  # end of file: the helper ends by itself
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)
        if child.poll() is None:
            child.terminate()


_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def sudo_lines(config: Config) -> list[list[str]]:
    """Every root command line of sudo mode: the VIP's, then the replica VIP's (sudoers)."""
    lines = PrivilegedCommands.from_config(config).all()
    if config.replica is not None:
        replica = dataclasses.replace(config, vip=config.replica.vip)
        # a peer's release over ssh refuses stale SYNs for the VIP only (release_for_peer),
        # and the hooks' promotion proves the VIP free with the root helper, not the replica's
        lines += [line for line in PrivilegedCommands.from_config(replica).all()
                  if line[1:2] not in ([tcpreset.HELPER], [arp.PROVER])]
    return lines


class VipNetwork:
    """Adapter over `ip`, `arping` and raw sockets for the configured VIP on this node."""

    def __init__(self, config: Config, announcer_file: Path | None = None, *,
                 lan_proof: bool = False) -> None:
        """lan_proof: in direct mode, prove an IPv4 address free with arp.lan_probe (the
        daemon: 80 ms on its own raw socket) rather than vip.probe_count/probe_timeout."""
        self.lan_proof = lan_proof
        self.reconfigure(config)
        self._announcer_pid_file = (announcer_file
                                    or statepaths.announcer_pid_file(config.state_dir))
        self._announcer: subprocess.Popen[str] | None = None
        self._nd_children: list[subprocess.Popen[str]] = []  # sudo mode IPv6 announcements
        # sudo mode: root helpers started ahead of a release (prepare_stale_refusal), with
        # the addresses they were started for
        self._refusal_soon: tuple[tuple[str, ...], tcpreset.HelperRefusals] | None = None
        # sudo mode with lan_proof: a root `arp-prove` helper per IPv4 address, kept while
        # this process runs; once one failed, arping proves instead
        self._provers: dict[str, RootProver] = {}
        self._prover_failed = False

    def reconfigure(self, config: Config) -> None:
        """Takes `config`'s command lines and mode (start, and a daemon's SIGHUP reload)."""
        self.config = config
        self.commands = PrivilegedCommands.from_config(config)
        self.members = (self.commands, *self.commands.others)  # one per address
        self._v4 = next((c for c in self.members if c.version == 4), None)
        self.mode = effective_mode(config.privilege_mode)

    def _privileged(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return run(privileged(argv, self.mode, self.config.commands.sudo), timeout=timeout,
                   privileged=True)

    def _change(self, member: PrivilegedCommands, argv: list[str], *, add: bool) -> str:
        """Adds or deletes one address: in-process over rtnetlink in direct mode (no fork
        while clients wait on the VIP), else (or if netlink refuses) `argv`; what went wrong,
        "" if nothing. The callers check the interface afterwards either way."""
        if self.mode == "direct":
            try:
                rtnl.change_address(member.interface, member.cidr, add=add,
                                    lifetime=member.lease, nodad=add, timeout=CHANGE_TIMEOUT)
                return ""
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.EADDRNOTAVAIL):
                    return ""  # already as asked; the caller's check says so
        result = self._privileged(argv, CHANGE_TIMEOUT)
        return first_line(result.stderr) if result.returncode != 0 else ""

    def interface_state(self) -> InterfaceState:
        """Unprivileged read of the interface, exact address comparison later: rtnetlink
        in-process (no fork: the daemon reads it several times a period), `ip -j` if that
        fails."""
        iface = self.config.vip.interface
        ipv4_only = all(c.version == 4 for c in self.members)
        with contextlib.suppress(OSError):
            return rtnl.read_interface(iface, ipv6=not ipv4_only, timeout=QUERY_TIMEOUT)
        return self._interface_state_from_ip(iface, ipv4_only)

    def _interface_state_from_ip(self, iface: str, ipv4_only: bool) -> InterfaceState:
        family = ["-4"] if ipv4_only else []
        result = run([self.config.commands.ip, "-j", *family, "address", "show", "dev", iface],
                     timeout=QUERY_TIMEOUT)
        if result.returncode != 0:
            return InterfaceState(False, False, "", ())
        try:
            links = json.loads(result.stdout or "[]")
        except json.JSONDecodeError as exc:
            raise CommandFailed(f"cannot parse `ip -j address show dev {iface}` output") from exc
        if not links:
            return InterfaceState(False, False, "", ())
        link = links[0]
        usable: list[str] = []
        pending: list[str] = []
        for info in link.get("addr_info", []):
            if info.get("family") not in ("inet", "inet6") or "local" not in info:
                continue
            text = f"{info['local']}/{info['prefixlen']}"
            waiting = info.get("tentative") or info.get("dadfailed")
            (pending if waiting else usable).append(text)
        flags = link.get("flags", [])
        return InterfaceState(True, "UP" in flags and "LOWER_UP" in flags,
                              str(link.get("address", "")), tuple(usable), tuple(pending))

    def held_as(self) -> str | None:
        """The first address as configured on the interface ("ip/len"), or None."""
        return self.interface_state().address_as(self.commands.address)

    def holds(self) -> bool:
        return self.interface_state().holds_all(self.config.vip.cidrs)

    def add(self) -> bool:
        """Adds every address not yet held; True if this call added any.

        IPv6 in direct mode is added with `nodad` (our probe came first, no tentative
        second). Through sudo the kernel's DAD probes it: it starts first, the other address
        is added meanwhile, and a conflict refuses (exit 3). Any failure removes what this
        call added, so a dual-stack VIP is never left in part.
        """
        state = self.interface_state()
        missing = [m for m in self.members if state.address_as(m.address) is None]
        by_kernel = [m for m in missing if m.version == 6 and self.mode != "direct"]
        added: list[PrivilegedCommands] = []
        try:
            started = [(m, self._start_kernel_dad(m, state)) for m in by_kernel]
            added.extend(by_kernel)
            for member in missing:
                if member in by_kernel:
                    continue
                argv = member.add(nodad=True)
                said = self._change(member, argv, add=True)
                if self.interface_state().address_as(member.address) is None:
                    raise CommandFailed(
                        f"could not add {member.cidr} to {member.interface}: "
                        f"{describe(argv)} said {said!r}; "
                        "check `repmgr-vip check` (sudo rules, interface)"
                    )
                added.append(member)
            for member, stderr in started:
                self._wait_kernel_dad(member, stderr)
        except VipError:
            if len(self.members) > 1:  # all or nothing: no half of a dual-stack VIP stays
                for member in added:
                    if self.interface_state().present_as(member.address) is not None:
                        self._privileged(member.delete(), CHANGE_TIMEOUT)
            raise
        return bool(missing)

    def _start_kernel_dad(self, member: PrivilegedCommands, state: InterfaceState) -> str:
        """Sudo mode: `ip -6 address add` without nodad; returns its stderr.

        No exact command line sends neighbour discovery packets, so the kernel does: its DAD
        solicits from :: (RFC 4862, our probe) and, with ndisc_notify=1, it sends the
        unsolicited override advertisement when DAD completes (our announcement).
        """
        problems = ndp.kernel_dad_problems(member.interface)
        if problems:
            raise CommandFailed(f"cannot add {member.cidr} through sudo: {problems[0]}")
        if state.present_as(member.address) is not None:  # tentative or failed: DAD afresh
            self._privileged(member.delete(), CHANGE_TIMEOUT)
        return self._privileged(member.add(), CHANGE_TIMEOUT).stderr

    def _wait_kernel_dad(self, member: PrivilegedCommands, stderr: str) -> None:
        """Waits until the kernel's DAD made the address usable; refuses if it failed."""
        deadline = time.monotonic() + ndp.kernel_dad_seconds(member.interface) + 2.0
        while time.monotonic() < deadline:
            now = self.interface_state()
            if now.address_as(member.address) is not None:
                return
            if now.present_as(member.address) is None:
                raise CommandFailed(
                    f"could not add {member.cidr} to {member.interface}: "
                    f"{describe(member.add())} said {first_line(stderr)!r}; "
                    "check `repmgr-vip check` (sudo rules, interface)")
            if self._dad_failed(member):
                self._privileged(member.delete(), CHANGE_TIMEOUT)  # unusable: leave nothing
                raise RefusedError(f"refusing {member.cidr}: the kernel's duplicate address "
                                   "detection found it in use on another host; release it "
                                   "there first")
            time.sleep(0.01)
        self._privileged(member.delete(), CHANGE_TIMEOUT)
        raise CommandFailed(f"{member.cidr} stayed tentative on {member.interface}; removed "
                            "it again; check the kernel's DAD settings")

    def _dad_failed(self, member: PrivilegedCommands) -> bool:
        result = run([self.config.commands.ip, "-j", "-6", "address", "show", "dev",
                      member.interface, "dadfailed"], timeout=QUERY_TIMEOUT)
        return any(normal_ip(str(info.get("local", ""))) == member.address
                   for link in _json_list(result.stdout)
                   for info in _list(link.get("addr_info")))

    def renew(self) -> None:
        """Extends the VIP's lifetime to vip.lease seconds from now (`ip address change`).

        The kernel re-creates an address that expired meanwhile, so only lease.LeaseKeeper
        calls this, right after seeing the address, and it checks how long that took.
        """
        if not self.commands.lease:
            return
        result = self._privileged(self.commands.renew(), CHANGE_TIMEOUT)
        if result.returncode != 0:
            raise CommandFailed(
                f"could not renew the lease of {self.config.vip.cidr} on "
                f"{self.config.vip.interface}: {describe(self.commands.renew())} said "
                f"{first_line(result.stderr)!r}; check `repmgr-vip check` (sudo rules)"
            )

    def remove(self) -> bool:
        """Removes every address of the VIP; True if this call removed any."""
        self.stop_announcer()
        state = self.interface_state()
        present = [(m, held) for m in self.members
                   if (held := state.present_as(m.address)) is not None]
        for member, held in present:
            if held != member.cidr and _normal_cidr(held) != _normal_cidr(member.cidr):
                raise CommandFailed(
                    f"{held} is on {member.interface} but the config says {member.cidr}; "
                    f"remove it by hand (`ip address del {held} dev {member.interface}`) "
                    "or fix vip.address"
                )
        errors = [said for member, _ in present
                  if (said := self._change(member, member.delete(), add=False))]
        if any(self.interface_state().present_as(m.address) for m, _ in present):
            raise CommandFailed(
                f"could not remove {self.config.vip.cidr} from {self.config.vip.interface}: "
                f"{errors[0] if errors else ''!r}; check `repmgr-vip check` (sudo rules)"
            )
        return bool(present)

    def probe(self) -> ProbeResult:
        """Asks the segment who answers for any address of the VIP (our own kernel never
        answers our probe); the addresses are probed at the same time."""
        if len(self.members) == 1:
            return ProbeResult(*self._probe_one(self.members[0]))
        results: list[tuple[tuple[str, ...], bool] | BaseException] = [
            ((), False) for _ in self.members]

        def one(index: int, member: PrivilegedCommands) -> None:
            try:
                results[index] = self._probe_one(member)
            except Exception as exc:  # re-raised below, in the caller
                results[index] = exc

        _in_threads([functools.partial(one, i, m) for i, m in enumerate(self.members)])
        macs: dict[str, None] = {}
        complete = True
        for result in results:
            if isinstance(result, BaseException):
                raise result
            macs.update(dict.fromkeys(result[0]))
            complete = complete and result[1]
        return ProbeResult(tuple(macs), complete)

    def probe_all(self) -> tuple[str, ...]:
        """Direct mode with the LAN proof: every MAC that answers for any address of the VIP
        within the whole window, not only the first (a prior proof for fencing.Fencing)."""
        vip = self.config.vip
        if self.mode != "direct" or not self.lan_proof:
            raise CommandFailed("a complete proof needs direct mode and daemon.lan_proof")
        macs: dict[str, None] = {}
        try:
            for member in self.members:
                if member.version == 6:
                    found = ndp.probe(vip.interface, member.address, arp.LAN_PROBES,
                                      arp.LAN_WINDOW, complete=True)
                else:
                    found = arp.lan_probe(vip.interface, member.address, complete=True)
                macs.update(dict.fromkeys(found))
        except OSError as exc:
            raise CommandFailed(f"probe on {vip.interface} failed: {exc.strerror}; direct "
                                "mode needs CAP_NET_RAW") from exc
        return tuple(macs)

    def _probe_one(self, member: PrivilegedCommands) -> tuple[tuple[str, ...], bool]:
        """(the MACs that answered for this address, whether every one within the window
        was heard: only the root helper's LAN proof listens through it; see ProbeResult)."""
        vip = self.config.vip
        if member.version == 6:
            if self.mode != "direct":  # the kernel's DAD on add; a held one: ndp's helper
                return self._nd_probe_through_sudo(member), False
            try:
                return ndp.probe(vip.interface, member.address, vip.probe_count,
                                 vip.probe_timeout), False
            except OSError as exc:
                raise CommandFailed(f"neighbour solicitation on {vip.interface} failed: "
                                    f"{exc.strerror}; direct mode needs CAP_NET_RAW") from exc
        if self.mode == "direct":
            try:
                if self.lan_proof:
                    return arp.lan_probe(vip.interface, member.address), False
                return arp.probe(vip.interface, member.address, vip.probe_count,
                                 vip.probe_timeout), False
            except OSError as exc:
                raise CommandFailed(f"ARP probe on {vip.interface} failed: {exc.strerror}; "
                                    "direct mode needs CAP_NET_RAW") from exc
        if self.lan_proof and not self._prover_failed:
            try:
                return self._prover(member).probe(), True
            except CommandFailed as exc:
                self._prover_failed = True
                LOG.warning("the LAN proof through sudo failed: %s; proving with arping -D "
                            "instead", exc)
        argv = privileged(member.probe(), self.mode, self.config.commands.sudo)
        proc = popen_text(argv, privileged=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        out, err, proven = _listen(proc, member.arping, vip.probe_timeout)
        macs = tuple(dict.fromkeys(m.lower() for m in _REPLY.findall(out)))
        if macs or proven:
            return macs, False
        raise CommandFailed(
            f"ARP probe failed (exit {proc.returncode}): "
            f"{first_line(err) or first_line(out)!r}; "
            "check `repmgr-vip check` (sudo rules, arping)"
        )

    @property
    def complete_proofs(self) -> bool:
        """Whether probe() hears every answer in its window (ProbeResult.complete): through
        sudo with the LAN proof, for a single IPv4 address (the root helper's proof)."""
        return (self.mode != "direct" and self.lan_proof and not self._prover_failed
                and len(self.members) == 1 and self.members[0].version == 4)

    def _prover(self, member: PrivilegedCommands) -> RootProver:
        argv = privileged(member.arp_prove(), self.mode, self.config.commands.sudo)
        key = " ".join(argv)
        if key not in self._provers:
            for stale in self._provers.values():  # another address or interface (a reload)
                stale.close()
            self._provers = {key: RootProver(argv)}
        return self._provers[key]

    def _nd_probe_through_sudo(self, member: PrivilegedCommands) -> tuple[str, ...]:
        if self.interface_state().address_as(member.address) is None:
            return ()  # not held: the kernel's DAD probes it when it is added (see add)
        result = self._privileged(member.nd_probe(), CHANGE_TIMEOUT)
        if result.returncode != 0:
            raise CommandFailed(f"IPv6 probe failed (exit {result.returncode}): "
                                f"{first_line(result.stderr)!r}; check `repmgr-vip check`")
        return tuple(line.strip().lower() for line in result.stdout.splitlines()
                     if line.strip())

    def _nd_announce_through_sudo(self) -> None:
        """Starts the helper in the background (it stops by itself once the address is
        gone); children started earlier are reaped here."""
        self._nd_children = [c for c in self._nd_children if c.poll() is None]
        for member in self.members:
            if member.version == 6:
                argv = privileged(member.nd_announce(), self.mode, self.config.commands.sudo)
                self._nd_children.append(popen_text(
                    argv, privileged=True, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, new_session=True))

    def stale_refusal(self) -> tcpreset.Refusals | tcpreset.HelperRefusals | None:
        """For each address of the VIP held here: opened before a release to a peer, started
        after it; until clients follow the peer's announcement, the SYNs they still send to
        our MAC get a reset instead of silence (tcpreset). Direct mode refuses in this
        process; sudo mode in a root helper per address (`refuse-stale`), ready before this
        returns. None when nothing is held, or the refusal cannot be had."""

        def released(address: str) -> bool:
            try:
                return self.interface_state().present_as(address) is None
            except VipError:
                return False

        held = [m for m in self.members if not released(m.address)]
        soon, self._refusal_soon = self._refusal_soon, None
        if soon is not None and (not held or soon[0] != tuple(m.address for m in held)):
            soon[1].cancel()  # prepared for other addresses than are held now
            soon = None
        if not held:
            return None
        if self.mode != "direct":
            refusal = soon[1] if soon is not None else self._launch_helpers(held)
            return refusal if refusal is not None and refusal.ready() else None
        return tcpreset.stale_refusal(self.config.vip.interface, [m.address for m in held],
                                      released)

    def prepare_stale_refusal(self) -> None:
        """Sudo mode: starts the root helpers for a release that comes after other work
        (`release --unless-newer-than` reads the timeline first), so that sudo and Python
        start meanwhile; stale_refusal takes them. Nothing in direct mode."""
        if self.mode == "direct" or self._refusal_soon is not None:
            return
        try:
            held = [m for m in self.members
                    if self.interface_state().present_as(m.address) is not None]
        except VipError:
            return
        refusal = self._launch_helpers(held) if held else None
        if refusal is not None:
            self._refusal_soon = (tuple(m.address for m in held), refusal)

    def _launch_helpers(self, held: list[PrivilegedCommands]) -> tcpreset.HelperRefusals | None:
        return tcpreset.HelperRefusals.launch([
            privileged(m.refuse_stale(), self.mode, self.config.commands.sudo) for m in held])

    def announce(self) -> None:
        """Tells the segment that the VIP is here now, so clients drop the old MAC at once.

        Direct mode sends announce_count packets per address announce_interval apart and
        returns. Through sudo, iputils arping spaces packets by whole seconds, so it runs in
        the background (the first packet leaves at once) and a later release stops it; a
        quick failure (sudo refused, bad interface) is still reported to the caller. An
        IPv6 address through sudo was announced by the kernel when its DAD completed.
        """
        self.stop_announcer()
        if self.mode == "direct":
            self._announce_direct()
            return
        self._nd_announce_through_sudo()  # IPv6: besides the kernel's advertisement at DAD
        if self._v4 is None:
            return
        argv = privileged(self._v4.announce(), self.mode, self.config.commands.sudo)
        proc = popen_text(argv, privileged=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, new_session=True)
        if _sent_first(proc, self._v4.arping, ANNOUNCE_FAILS_WITHIN):
            self._announcer = proc
            self._remember_announcer(proc.pid)
            return
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise CommandFailed(
                f"gratuitous ARP failed (exit {proc.returncode}): {first_line(stderr)!r}; "
                "check `repmgr-vip check` (sudo rules, arping)"
            )

    def _announce_direct(self) -> None:
        """The first round now (a failure is the caller's), the rest from a thread: a
        promotion adds the VIP before `repmgr standby promote` and must not wait for them."""
        vip = self.config.vip
        self._announce_round(vip.interface)
        if vip.announce_count > 1:
            threading.Thread(target=self._announce_rest, args=(vip.interface,),
                             name="announce", daemon=True).start()

    def _announce_round(self, interface: str) -> None:
        try:
            for member in self.members:
                if member.version == 6:
                    ndp.announce_once(interface, member.address)
                else:
                    arp.announce_once(interface, member.address)
        except OSError as exc:
            raise CommandFailed(f"announcing the VIP on {interface} failed: "
                                f"{exc.strerror}; direct mode needs CAP_NET_RAW") from exc

    def _announce_rest(self, interface: str) -> None:
        vip = self.config.vip
        try:
            for _ in range(vip.announce_count - 1):
                time.sleep(vip.announce_interval)
                if not self.holds():
                    return  # released meanwhile: never advertise an address we gave up
                self._announce_round(interface)
        except VipError as exc:
            LOG.warning("%s", exc)

    def _remember_announcer(self, pid: int) -> None:
        # best effort: without the file a release cannot cut a running announcement short
        with contextlib.suppress(OSError):
            statefiles.write_atomic(self._announcer_pid_file, f"{pid}\n")

    def stop_announcer(self) -> None:
        """Stops announcements still running, so a released VIP is never advertised again."""
        try:
            pid = int(statefiles.read_text(self._announcer_pid_file).strip())
        except (OSError, ValueError):
            return
        line = (self._v4 or self.commands).announce()
        if _is_our_announcer(pid, line):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and _is_our_announcer(pid, line):
                time.sleep(0.01)
        with contextlib.suppress(OSError):
            statefiles.remove(self._announcer_pid_file)
        if self._announcer is not None:  # reap it, so a long-lived daemon leaves no zombie
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._announcer.wait(timeout=1.0)
            self._announcer = None


def _normal_cidr(cidr: str) -> str:
    try:
        return ipaddress.ip_interface(cidr).with_prefixlen
    except ValueError:
        return cidr


def _json_list(text: str) -> list[dict[str, object]]:
    try:
        data = json.loads(text or "[]")
    except json.JSONDecodeError:
        return []
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def _list(value: object) -> list[dict[str, object]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _in_threads(jobs: list[Callable[[], None]]) -> None:
    """Runs the jobs at the same time, so a dual-stack probe costs one probe window."""
    threads = [threading.Thread(target=job, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii")
    except OSError:
        return []
    return [int(word) for word in text.split()]


def _running_as(proc: subprocess.Popen[str], program: str) -> list[int]:
    """The pids of `program` started by proc (sudo, with use_pty a monitor in between)."""
    children = _children(proc.pid)
    pids = [proc.pid, *children, *(g for c in children for g in _children(c))]
    return [pid for pid in pids if _command_name(pid) == os.path.basename(program)]


def _sent_first(proc: subprocess.Popen[str], arping: str, bound: float) -> bool:
    """Whether `sudo arping -U` got as far as waiting after its first packet (sudo allowed
    it, the interface exists) within `bound` seconds; False once it ended (a failure for
    the caller to read). A promotion adds the VIP before `repmgr standby promote`: it waits
    for this, a few milliseconds, not for a fixed bound. Still starting at the bound: True
    (iputils arping sleeps a whole second between packets; a later failure is its own)."""
    deadline = time.monotonic() + bound
    while proc.poll() is None:
        if any(_state(pid) == "S" for pid in _running_as(proc, arping)):
            return True
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.002)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return ""


def _listen(proc: subprocess.Popen[str], arping: str, window: float) -> tuple[str, str, bool]:
    """Lets `arping -D` listen for `window` seconds, then stops it: (stdout, stderr, proven).

    iputils arping waits whole seconds. It is stopped with SIGINT (sudo passes it on) once it
    has listened for `window` seconds; it then prints how many probes it sent. Silence proves
    the VIP free only if at least one probe left ("Sent N probes", N >= 1).
    """
    deadline = time.monotonic() + CHANGE_TIMEOUT
    started: float | None = None
    while proc.poll() is None and time.monotonic() < deadline:
        if started is None:
            if _running_as(proc, arping):
                started = time.monotonic()
        elif time.monotonic() >= started + window:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    try:
        out, err = proc.communicate(timeout=CHANGE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    sent = _SENT.search(out)
    return out, err, bool(sent and int(sent.group(1)) >= 1)


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _is_our_announcer(pid: int, announce_argv: list[str]) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not alive(pid):
        return False
    words = [w.decode(errors="replace") for w in cmdline if w]
    return words[-len(announce_argv):] == announce_argv
