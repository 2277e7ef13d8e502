"""IPv6 and dual-stack VIPs in the lab: real repmgrd, hooks as postgres through sudo (so the
kernel's DAD probes and its ndisc_notify advertisement announces), a sampler per address.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from lab import VIP, VIP6, VIP6_IP, VIP_IP, Lab, Node, VipSampler
from repmgr_vip.core.decide import CONFLICT
from tests.integration.vipconf import (
    REPMGR_VIP,
    config_path,
    install_generated_sudoers,
    journal_entries,
    start_daemon,
    stop_daemon,
    vip,
    vip_log,
    wire_hooks,
    write_vip_config,
)

pytestmark = pytest.mark.lab

FAILOVER_TIMEOUT = 60.0


def _hooked(lab: Lab, address: str) -> None:
    """As vipconf.hooked_cluster, with the given vip.address (TOML: a string or a list)."""
    for node in lab.nodes:
        write_vip_config(lab, node, address=address)
    install_generated_sudoers(lab, lab.nodes[0])
    for node in lab.nodes:
        wire_hooks(lab, node)
    for node in lab.nodes:
        result = lab.repmgr(node, "daemon", "start", check=False, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def _client_sees_primary(lab: Lab, host: str) -> bool:
    result = lab.client_psql("SELECT pg_is_in_recovery()", host=host, check=False, timeout=5)
    return result.returncode == 0 and result.stdout.strip() == "f"


def _wait(lab: Lab, what: str, predicate: Callable[[], bool],
          timeout: float = FAILOVER_TIMEOUT) -> float:
    started = time.monotonic()
    lab.wait_for(predicate, timeout, interval=0.02, what=what)
    return time.monotonic() - started


def _new_primary(lab: Lab, old: Node) -> Node | None:
    return next((n for n in lab.nodes if n is not old and lab.is_in_recovery(n) is False), None)


def test_ipv6_vip_follows_kill9_and_the_client_neighbour_entry_follows(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    _hooked(lab, VIP6)
    node1 = lab.nodes[0]
    _wait(lab, "IPv6 VIP on node1", lambda: lab.vip_holders(VIP6_IP) == ["node1"], 20)
    assert lab.vip_holders(VIP_IP) == []  # no IPv4 VIP configured, none added
    _wait(lab, "client reaches the primary over IPv6",
          lambda: _client_sees_primary(lab, VIP6_IP), 20)
    assert lab.client_neigh_mac(VIP6_IP) == node1.mac
    with VipSampler(lab, ip=VIP6_IP) as sampler:
        killed = time.monotonic()
        lab.kill_postgres(node1)
        _wait(lab, "a standby promoted", lambda: _new_primary(lab, node1) is not None)
        new = _new_primary(lab, node1)
        assert new is not None
        _wait(lab, f"IPv6 VIP on {new.name}", lambda: lab.vip_holders(VIP6_IP) == [new.name], 20)
        moved = time.monotonic()
        # no traffic from the client yet: only the unsolicited advertisement can change it
        _wait(lab, "client neighbour entry shows the new holder",
              lambda: lab.client_neigh_mac(VIP6_IP) == new.mac, 5)
        followed = time.monotonic()
        _wait(lab, "client reaches the new primary over IPv6",
              lambda: _client_sees_primary(lab, VIP6_IP), 20)
    sampler.assert_never_two()
    print(f"\nIPv6 kill -9: VIP on {new.name} {moved - killed:.2f} s after the kill; "
          f"client neighbour entry {followed - moved:.2f} s after that")
    # journaled once the releases asked after the add were waited for (SETTLE_WAIT)
    _wait(lab, f"{new.name} journaled the VIP held",
          lambda: bool(journal_entries(new, action="acquire", outcome="held")), 10)


def test_dual_stack_addresses_move_together_on_failover(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    _hooked(lab, f'["{VIP}", "{VIP6}"]')
    node1 = lab.nodes[0]
    _wait(lab, "both addresses on node1", lambda: lab.vip_holders(VIP_IP) == ["node1"]
          and lab.vip_holders(VIP6_IP) == ["node1"], 20)
    for host in (VIP_IP, VIP6_IP):
        _wait(lab, f"client reaches the primary via {host}",
              lambda host=host: _client_sees_primary(lab, host), 20)
    with VipSampler(lab, ip=VIP_IP) as v4, VipSampler(lab, ip=VIP6_IP) as v6:
        lab.kill_postgres(node1)
        _wait(lab, "a standby promoted", lambda: _new_primary(lab, node1) is not None)
        new = _new_primary(lab, node1)
        assert new is not None
        _wait(lab, f"both addresses on {new.name}", lambda: lab.vip_holders(VIP_IP)
              == [new.name] and lab.vip_holders(VIP6_IP) == [new.name], 20)
        assert lab.client_neigh_mac(VIP6_IP) == new.mac or _wait(
            lab, "client IPv6 neighbour entry follows",
            lambda: lab.client_neigh_mac(VIP6_IP) == new.mac, 5) >= 0
        for host in (VIP_IP, VIP6_IP):
            _wait(lab, f"client reaches the new primary via {host}",
                  lambda host=host: _client_sees_primary(lab, host), 20)
    v4.assert_never_two()
    v6.assert_never_two()
    # together: the holder sets of the two samplers changed within one promotion step
    t4 = v4.first_time(lambda h: h == (new.name,))
    t6 = v6.first_time(lambda h: h == (new.name,))
    assert t4 is not None and t6 is not None
    print(f"\ndual stack: IPv4 and IPv6 reached {new.name} {abs(t4 - t6):.2f} s apart")
    assert abs(t4 - t6) < 3.0


def _ping6(lab: Lab) -> None:
    """One echo from the client, so it has a neighbour entry for the VIP."""
    lab.run(None, ["ping", "-6", "-c", "1", "-W", "2", VIP6_IP], user="root")


@pytest.mark.parametrize("user", ["root", "postgres"], ids=["direct", "sudo"])
def test_ipv6_acquire_refuse_release_move(lab_factory: Callable[..., Lab], user: str) -> None:
    """Direct mode (root): our DAD probe, `nodad`, our advertisements. Sudo mode (postgres
    with the generated rules only): the kernel's DAD and its ndisc_notify advertisement."""
    lab = lab_factory(nodes=2)
    for node in lab.nodes:
        write_vip_config(lab, node, address=VIP6)
    install_generated_sudoers(lab, lab.nodes[0])
    a, b = lab.nodes
    with VipSampler(lab, ip=VIP6_IP) as sampler:
        started = time.monotonic()
        first = vip(lab, a, "acquire", user=user)
        acquire_seconds = time.monotonic() - started
        assert first.returncode == 0, first.stderr
        assert lab.vip_holders(VIP6_IP) == [a.name]
        _ping6(lab)
        assert lab.client_neigh_mac(VIP6_IP) == a.mac

        refused = vip(lab, b, "acquire", user=user)
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        assert lab.vip_holders(VIP6_IP) == [a.name]
        assert VIP6_IP not in str(lab._link_json(b.netns, "addr", "show", "dev", "eth0"))

        assert vip(lab, a, "release", user=user).returncode == 0
        assert lab.vip_holders(VIP6_IP) == []
        moved = vip(lab, b, "acquire", user=user)
        assert moved.returncode == 0, moved.stderr
        assert lab.vip_holders(VIP6_IP) == [b.name]
        # the client never asked: the unsolicited override advertisement moved its entry
        lab.wait_for(lambda: lab.client_neigh_mac(VIP6_IP) == b.mac, 5.0,
                     what="client neighbour entry follows")
        _ping6(lab)
        assert vip(lab, b, "release", user=user).returncode == 0
    sampler.assert_never_two()
    print(f"\n{user}: acquire of a free IPv6 VIP took {acquire_seconds:.2f} s")


def test_daemon_direct_mode_dual_stack_conflict_and_repair(
        lab_factory: Callable[..., Lab]) -> None:
    """The daemon as the unit runs it (postgres with CAP_NET_RAW/ADMIN: direct mode): its
    NDP probe sees another MAC answering for the IPv6 address and fences it; a VIP missing
    its IPv6 half is completed (holds = holds every address)."""
    lab = lab_factory(nodes=3)
    _hooked(lab, f'["{VIP}", "{VIP6}"]')
    node1, node2, _ = lab.nodes
    daemons = {n.name: start_daemon(lab, n) for n in lab.nodes}
    try:
        _wait(lab, "every daemon has run a cycle", lambda: all(
            (n.dir / "repmgr-vip-daemon.json").exists() for n in lab.nodes), 30)
        with VipSampler(lab, ip=VIP_IP) as v4:
            lab.run(node1, ["ip", "-6", "address", "del", VIP6, "dev", "eth0"], user="root")
            back = _wait(lab, "IPv6 half re-added on node1",
                         lambda: lab.vip_holders(VIP6_IP) == ["node1"], 10)
            assert lab.vip_holders(VIP_IP) == ["node1"]
        v4.assert_never_two()
        print(f"\ndaemon re-added the missing IPv6 address after {back:.2f} s")

        stop_daemon(daemons["node2"])
        lab.run(node2, ["ip", "-6", "address", "add", VIP6, "dev", "eth0", "nodad"],
                user="root")
        _wait(lab, "node2's copy fenced away by node1", lambda: VIP6_IP not in str(
            lab._link_json(node2.netns, "addr", "show", "dev", "eth0")), 30)
        # the decision journal: node1 decided to fence because node2's MAC answered too
        assert any(node2.mac in e.get("inputs", {}).get("foreign", [])
                   for e in journal_entries(node1, action="fence-conflict", alarm=CONFLICT)), \
            vip_log(node1)
        assert lab.vip_holders(VIP6_IP) == ["node1"]
        assert lab.vip_holders(VIP_IP) == ["node1"]
    finally:
        for proc in daemons.values():
            if proc.poll() is None:
                stop_daemon(proc)


def test_dual_stack_addresses_move_together_on_switchover(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    _hooked(lab, f'["{VIP}", "{VIP6}"]')
    node2 = lab.nodes[1]
    _wait(lab, "both addresses on node1", lambda: lab.vip_holders(VIP_IP) == ["node1"]
          and lab.vip_holders(VIP6_IP) == ["node1"], 20)
    with VipSampler(lab, ip=VIP_IP) as v4, VipSampler(lab, ip=VIP6_IP) as v6:
        result = lab.repmgr(node2, "standby", "switchover", "--siblings-follow",
                            "--always-promote", check=False, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
        _wait(lab, "both addresses on node2 only", lambda: lab.vip_holders(VIP_IP)
              == ["node2"] and lab.vip_holders(VIP6_IP) == ["node2"], 20)
        for host in (VIP_IP, VIP6_IP):
            _wait(lab, f"client reaches the new primary via {host}",
                  lambda host=host: _client_sees_primary(lab, host), 20)
        _wait(lab, "client IPv6 neighbour entry follows",
              lambda: lab.client_neigh_mac(VIP6_IP) == node2.mac, 5)
    v4.assert_never_two()
    v6.assert_never_two()


BOGUS_MAC = "02:00:00:00:00:99"


def test_sudo_mode_daemon_probes_and_reannounces_ipv6(lab_factory: Callable[..., Lab]) -> None:
    """The daemon as postgres without capabilities (sudo mode, the generated rules only):
    `repmgr-vip nd-announce` through sudo re-announces the held IPv6 VIP (a client's stale
    entry with a wrong MAC is corrected while the client sends nothing), and `nd-probe`
    through sudo sees a second holder, which is then fenced over SSH."""
    lab = lab_factory(nodes=3)
    extra = ('[privileges]\nmode = "sudo"\n\n[daemon]\nreannounce_interval = 2.0\n'
             "conflict_probe_interval = 1.0\n")
    for node in lab.nodes:
        write_vip_config(lab, node, extra, address=VIP6)
    rules = install_generated_sudoers(lab, lab.nodes[0])
    assert "nd-probe" in rules and "nd-announce" in rules
    for node in lab.nodes:
        wire_hooks(lab, node)
    for node in lab.nodes:
        result = lab.repmgr(node, "daemon", "start", check=False, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    node1, node2, _ = lab.nodes
    _wait(lab, "IPv6 VIP on node1", lambda: lab.vip_holders(VIP6_IP) == ["node1"], 20)
    checked = vip(lab, node1, "check")
    assert "FAIL  root helper" not in checked.stdout, checked.stdout
    # the helper as root with any other arguments, or any other subcommand: refused
    for argv in (["nd-probe", "eth0", "2001:db8::200", "2", "0.3"],
                 ["nd-announce", "eth0", VIP6_IP, "100", "0"],
                 ["-c", "/tmp/x.toml", "daemon"], ["check"]):
        denied = lab.run(node1, ["sudo", "-n", REPMGR_VIP, *argv], check=False)
        assert denied.returncode != 0, (argv, denied.stdout)
    daemons = {n.name: lab.popen(n, [REPMGR_VIP, "-c", str(config_path(n)), "daemon"],
                                 user="postgres", stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL) for n in lab.nodes}
    try:
        _wait(lab, "every daemon has run a cycle", lambda: all(
            (n.dir / "repmgr-vip-daemon.json").exists() for n in lab.nodes), 30)
        lab.run(None, ["ip", "-6", "neigh", "replace", VIP6_IP, "lladdr", BOGUS_MAC, "dev",
                       "eth0", "nud", "stale"], user="root")
        assert lab.client_neigh_mac(VIP6_IP) == BOGUS_MAC
        fixed = _wait(lab, "the client's entry corrected by a re-announcement",
                      lambda: lab.client_neigh_mac(VIP6_IP) == node1.mac, 10)
        print(f"\nsudo mode: re-announced within {fixed:.2f} s of a wrong client entry")

        stop_daemon(daemons["node2"])
        lab.run(node2, ["ip", "-6", "address", "add", VIP6, "dev", "eth0", "nodad"],
                user="root")
        gone = _wait(lab, "node2's copy fenced away by node1", lambda: VIP6_IP not in str(
            lab._link_json(node2.netns, "addr", "show", "dev", "eth0")), 30)
        print(f"sudo mode: a second IPv6 holder fenced after {gone:.2f} s")
        # the decision journal: node1 decided to fence because node2's MAC answered too
        assert any(node2.mac in e.get("inputs", {}).get("foreign", [])
                   for e in journal_entries(node1, action="fence-conflict", alarm=CONFLICT)), \
            vip_log(node1)
        assert lab.vip_holders(VIP6_IP) == ["node1"]
    finally:
        for proc in daemons.values():
            if proc.poll() is None:
                stop_daemon(proc)
