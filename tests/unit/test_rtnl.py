"""The daemon's in-process interface read says exactly what `ip -j address show` says.

Read-only (no traffic, no root): every interface of the namespace the tests run in, both
families and IPv4 only, plus a missing interface; and a failing netlink read falls back to
`ip` instead of reading as "no address".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from repmgr_vip.adapters import network, rtnl
from repmgr_vip.app import lease
from repmgr_vip.config.schema import Config, load_config

IP = shutil.which("ip") or "/usr/sbin/ip"


def _config(write_config: Callable[..., Path], interface: str) -> Config:
    """conftest's config with the VIP on `interface` (never added: only read here)."""
    return load_config(write_config(interface=interface), check_host=False)


def _links() -> dict[str, str]:
    """Interface name -> MAC, as `ip -j link` reports them."""
    out = subprocess.run([IP, "-j", "link", "show"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return {link["ifname"]: link.get("address", "") for link in json.loads(out)}


@pytest.mark.parametrize("ipv4_only", [True, False], ids=["ipv4", "both"])
def test_netlink_reads_what_ip_reads_on_every_interface(write_config: Callable[..., Path],
                                                        ipv4_only: bool) -> None:
    links = _links()
    assert "lo" in links
    for name, mac in links.items():
        vip = network.VipNetwork(_config(write_config, name))
        by_netlink = rtnl.read_interface(name, ipv6=not ipv4_only)
        # `ip -4` leaves out the link's MAC (check printed "mac ,") and an interface without
        # IPv4 address altogether (read as missing); so compare with the full read, filtered
        by_ip = vip._interface_state_from_ip(name, False)
        if ipv4_only:
            by_ip = dataclasses.replace(
                by_ip, addresses=tuple(a for a in by_ip.addresses if ":" not in a),
                pending=tuple(a for a in by_ip.pending if ":" not in a))
        assert by_netlink.mac == mac, name
        assert by_netlink == by_ip, name
    lo = rtnl.read_interface("lo")
    assert lo.exists and lo.up and "127.0.0.1/8" in lo.addresses


def test_a_missing_interface_reads_as_missing(write_config: Callable[..., Path]) -> None:
    state = network.VipNetwork(_config(write_config, "nosuch0")).interface_state()
    assert (state.exists, state.up, state.addresses) == (False, False, ())
    assert rtnl.read_interface("nosuch0") == state


def test_a_failing_netlink_read_falls_back_to_ip(write_config: Callable[..., Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> object:
        raise OSError("netlink refused")

    monkeypatch.setattr(rtnl, "read_interface", broken)
    state = network.VipNetwork(_config(write_config, "lo")).interface_state()
    assert state.exists and "127.0.0.1/8" in state.addresses


_CHANGE = """
import json, subprocess, sys
from repmgr_vip.adapters import rtnl
cidr, lease = sys.argv[1], int(sys.argv[2])
shown = lambda: [f"{a['local']}/{a['prefixlen']}" for link in json.loads(subprocess.run(
    ["ip", "-j", "address", "show", "dev", "dummy0"], capture_output=True, text=True,
    check=True).stdout) for a in link["addr_info"]]
rtnl.change_address("dummy0", cidr, add=True, lifetime=lease, nodad=True)
added = shown()
try:
    rtnl.change_address("dummy0", cidr, add=True)
    again = "no error"
except OSError as exc:
    again = exc.errno
valid = [a.get("valid_life_time") for link in json.loads(subprocess.run(
    ["ip", "-j", "address", "show", "dev", "dummy0"], capture_output=True, text=True,
    check=True).stdout) for a in link["addr_info"]]
rtnl.change_address("dummy0", cidr, add=False)
print(json.dumps({"added": added, "again": again, "valid": valid, "removed": shown()}))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0,
                    reason="needs root for a private network namespace")
@pytest.mark.parametrize(("cidr", "lease"), [("192.0.2.10/24", 0), ("192.0.2.11/24", 30),
                                             ("2001:db8::10/64", 0)])
def test_netlink_adds_and_deletes_an_address_as_ip_does(cidr: str, lease: int) -> None:
    """In a namespace of its own, on one end of a veth pair (no packet leaves it)."""
    import errno
    import os
    import sys

    namespace = f"rvt-rtnl-{os.getpid()}"
    subprocess.run([IP, "netns", "add", namespace], check=True, timeout=10)
    try:
        def inside(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([IP, "netns", "exec", namespace, *argv], capture_output=True,
                                  text=True, check=True, timeout=30)

        inside(IP, "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1")
        inside(IP, "link", "set", "dummy0", "up")
        src = str(Path(rtnl.__file__).resolve().parents[2])
        out = inside("env", f"PYTHONPATH={src}", sys.executable, "-c", _CHANGE, cidr,
                     str(lease)).stdout
        result = json.loads(out)
    finally:
        subprocess.run([IP, "netns", "delete", namespace], timeout=10, check=False)
    assert cidr in result["added"]
    assert result["again"] == errno.EEXIST
    if lease:
        assert all(0 < int(v) <= lease for v in result["valid"]), result["valid"]
    assert cidr not in result["removed"]
def test_netlink_lifetime_reads_what_ip_reads_for_every_ipv4_address() -> None:
    """The lease keeper's per-cycle read (valid_life_time) without forking `ip`."""
    out = subprocess.run([IP, "-j", "-4", "address", "show"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    seen = 0
    for link in json.loads(out):
        for info in link.get("addr_info", []):
            if info.get("family") != "inet":
                continue
            valid = int(info.get("valid_life_time", rtnl.FOREVER))
            expected = math.inf if valid >= rtnl.FOREVER else float(valid)
            got = rtnl.valid_lifetime(link["ifname"], info["local"])
            # a finite lifetime counts down between the two reads
            assert got is not None and (got == expected or 0 <= expected - got <= 1), info
            seen += 1
    assert seen and rtnl.valid_lifetime("lo", "127.0.0.1") == math.inf
    assert rtnl.valid_lifetime("lo", "192.0.2.77") is None
    assert rtnl.valid_lifetime("nosuch0", "127.0.0.1") is None


def test_the_lease_read_forks_no_ip(write_config: Callable[..., Path],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every daemon asks the VIP's lifetime each cycle: no `ip` process for it."""
    def no_fork(*_args: object, **_kwargs: object) -> object:
        raise AssertionError("forked ip")

    monkeypatch.setattr(lease, "run", no_fork)
    config = _config(write_config, "lo")
    assert lease.read_lifetime(config) is None  # the test VIP is never on lo
    held = dataclasses.replace(config, vip=dataclasses.replace(
        config.vip, address=ipaddress.ip_interface("127.0.0.1/8")))
    assert lease.read_lifetime(held) == math.inf


def test_a_failing_netlink_lifetime_read_falls_back_to_ip(
        write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> object:
        raise OSError("netlink refused")

    monkeypatch.setattr(rtnl, "valid_lifetime", broken)
    config = _config(write_config, "lo")
    held = dataclasses.replace(config, vip=dataclasses.replace(
        config.vip, address=ipaddress.ip_interface("127.0.0.1/8")))
    assert lease.read_lifetime(held) == math.inf
