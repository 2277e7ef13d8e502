"""The VIP on the local interface: query, add, remove, announce (gratuitous ARP), probe.

Every change is verified by reading the interface back, which makes each action idempotent:
adding a present address or removing an absent one is success. The privileged command lines
are built in one place (`PrivilegedCommands`) so that what runs and what `repmgr-vip sudoers`
allows can never drift apart.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from repmgr_vip import arp, statefiles
from repmgr_vip.config import Config
from repmgr_vip.errors import CommandFailed
from repmgr_vip.model import InterfaceState as InterfaceState  # re-exported
from repmgr_vip.model import ProbeResult as ProbeResult  # re-exported
from repmgr_vip.privileges import effective_mode, privileged
from repmgr_vip.process import alive, describe, first_line, popen_text, run

_SENT = re.compile(r"Sent (\d+) probe")
_REPLY = re.compile(r"reply from\s+\S+\s+\[([0-9A-Fa-f:]{17})\]", re.IGNORECASE)
QUERY_TIMEOUT = 5.0
CHANGE_TIMEOUT = 10.0


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

    @classmethod
    def from_config(cls, config: Config) -> PrivilegedCommands:
        return cls(
            ip=config.commands.ip,
            arping=config.commands.arping,
            cidr=config.vip.cidr,
            address=config.vip.ip,
            interface=config.vip.interface,
            announce_count=config.vip.announce_count,
            probe_count=config.vip.probe_count,
            probe_timeout=config.vip.probe_timeout,
            lease=math.ceil(config.vip.lease),
        )

    def _lifetime(self) -> list[str]:
        if not self.lease:
            return []
        return ["valid_lft", str(self.lease), "preferred_lft", str(self.lease)]

    def add(self) -> list[str]:
        return [self.ip, "-4", "address", "add", self.cidr, "dev", self.interface,
                *self._lifetime()]

    def renew(self) -> list[str]:
        # IPv4 `change` (like `replace`) also creates a missing address: see lease.py
        return [self.ip, "-4", "address", "change", self.cidr, "dev", self.interface,
                *self._lifetime()]

    def delete(self) -> list[str]:
        return [self.ip, "-4", "address", "del", self.cidr, "dev", self.interface]

    def announce(self) -> list[str]:
        return [self.arping, "-U", "-c", str(self.announce_count), "-I", self.interface,
                self.address]

    def probe(self) -> list[str]:
        # iputils arping counts its deadline in whole seconds
        deadline = str(max(1, math.ceil(self.probe_timeout)))
        return [self.arping, "-D", "-c", str(self.probe_count), "-w", deadline,
                "-I", self.interface, self.address]

    def all(self) -> list[list[str]]:
        leased = [self.renew()] if self.lease else []
        return [self.add(), self.delete(), self.announce(), self.probe(), *leased]


class VipNetwork:
    """Adapter over `ip` and `arping` for the configured VIP on this node."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.commands = PrivilegedCommands.from_config(config)
        self.mode = effective_mode(config.privilege_mode)
        self._announcer_pid_file = statefiles.announcer_pid_file(config.state_dir)
        self._announcer: subprocess.Popen[str] | None = None

    def _privileged(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return run(privileged(argv, self.mode, self.config.commands.sudo), timeout=timeout,
                   privileged=True)

    def interface_state(self) -> InterfaceState:
        """Unprivileged read of the interface (`ip -j`), exact address comparison later."""
        iface = self.config.vip.interface
        result = run([self.config.commands.ip, "-j", "-4", "address", "show", "dev", iface],
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
        addresses = tuple(
            f"{info['local']}/{info['prefixlen']}"
            for info in link.get("addr_info", [])
            if info.get("family") == "inet" and "local" in info
        )
        flags = link.get("flags", [])
        return InterfaceState(True, "UP" in flags and "LOWER_UP" in flags,
                              str(link.get("address", "")), addresses)

    def held_as(self) -> str | None:
        """The VIP as configured on the interface ("ip/len"), or None; exact IP match."""
        return self.interface_state().address_as(self.config.vip.ip)

    def holds(self) -> bool:
        return self.held_as() is not None

    def add(self) -> bool:
        """Adds the VIP; returns True if this call added it, False if it was already there."""
        if self.holds():
            return False
        result = self._privileged(self.commands.add(), CHANGE_TIMEOUT)
        if not self.holds():
            raise CommandFailed(
                f"could not add {self.config.vip.cidr} to {self.config.vip.interface}: "
                f"{describe(self.commands.add())} said {first_line(result.stderr)!r}; "
                "check `repmgr-vip check` (sudo rules, interface)"
            )
        return True

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
        """Removes the VIP; returns True if this call removed it, False if it was absent."""
        self.stop_announcer()
        held = self.held_as()
        if held is None:
            return False
        if held != self.config.vip.cidr:
            raise CommandFailed(
                f"{held} is on {self.config.vip.interface} but the config says "
                f"{self.config.vip.cidr}; remove it by hand (`ip address del {held} dev "
                f"{self.config.vip.interface}`) or fix vip.address"
            )
        result = self._privileged(self.commands.delete(), CHANGE_TIMEOUT)
        if self.holds():
            raise CommandFailed(
                f"could not remove {self.config.vip.cidr} from {self.config.vip.interface}: "
                f"{first_line(result.stderr)!r}; check `repmgr-vip check` (sudo rules)"
            )
        return True

    def probe(self) -> ProbeResult:
        """Asks the segment who answers for the VIP (our own kernel never answers our probe)."""
        vip = self.config.vip
        if self.mode == "direct":
            try:
                return ProbeResult(arp.probe(vip.interface, vip.ip, vip.probe_count,
                                             vip.probe_timeout))
            except OSError as exc:
                raise CommandFailed(f"ARP probe on {vip.interface} failed: {exc.strerror}; "
                                    "direct mode needs CAP_NET_RAW") from exc
        argv = privileged(self.commands.probe(), self.mode, self.config.commands.sudo)
        proc = popen_text(argv, privileged=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        out, err, proven = _listen(proc, self.commands.arping, vip.probe_timeout)
        macs = tuple(dict.fromkeys(m.lower() for m in _REPLY.findall(out)))
        if macs or proven:
            return ProbeResult(macs)
        raise CommandFailed(
            f"ARP probe failed (exit {proc.returncode}): "
            f"{first_line(err) or first_line(out)!r}; "
            "check `repmgr-vip check` (sudo rules, arping)"
        )

    def announce(self) -> None:
        """Tells the segment that the VIP is here now, so clients drop the old MAC at once.

        Direct mode sends announce_count packets announce_interval apart and returns. Through
        sudo, iputils arping spaces packets by whole seconds, so it runs in the background
        (the first packet leaves at once) and a later release stops it; a quick failure (sudo
        refused, bad interface) is still reported to the caller.
        """
        self.stop_announcer()
        if self.mode == "direct":
            self._announce_direct()
            return
        argv = privileged(self.commands.announce(), self.mode, self.config.commands.sudo)
        proc = popen_text(argv, privileged=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, new_session=True)
        try:
            _, stderr = proc.communicate(timeout=0.1)
        except subprocess.TimeoutExpired:
            self._announcer = proc
            self._remember_announcer(proc.pid)
            return
        if proc.returncode != 0:
            raise CommandFailed(
                f"gratuitous ARP failed (exit {proc.returncode}): {first_line(stderr)!r}; "
                "check `repmgr-vip check` (sudo rules, arping)"
            )

    def _announce_direct(self) -> None:
        vip = self.config.vip
        try:
            for index in range(vip.announce_count):
                if index:
                    time.sleep(vip.announce_interval)
                    if not self.holds():
                        return  # released meanwhile: never advertise an address we gave up
                arp.announce_once(vip.interface, vip.ip)
        except OSError as exc:
            raise CommandFailed(f"gratuitous ARP on {vip.interface} failed: {exc.strerror}; "
                                "direct mode needs CAP_NET_RAW") from exc

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
        if _is_our_announcer(pid, self.commands.announce()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and _is_our_announcer(pid, self.commands.announce()):
                time.sleep(0.01)
        with contextlib.suppress(OSError):
            statefiles.remove(self._announcer_pid_file)
        if self._announcer is not None:  # reap it, so a long-lived daemon leaves no zombie
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._announcer.wait(timeout=1.0)
            self._announcer = None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii")
    except OSError:
        return []
    return [int(word) for word in text.split()]


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
            children = _children(proc.pid)  # sudo with use_pty adds a monitor in between
            pids = [proc.pid, *children, *(g for c in children for g in _children(c))]
            if any(_command_name(pid) == os.path.basename(arping) for pid in pids):
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
