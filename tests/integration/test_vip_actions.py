"""The foundation in a real lab: acquire, refuse, release, move, check, least-privilege sudo.

Every command runs as the postgres user inside a node's network namespace with only the
sudoers rules that `repmgr-vip sudoers` generates installed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lab import VIP_IP, Lab, VipSampler
from tests.integration.vipconf import (
    install_generated_sudoers,
    vip,
    wire_hooks,
    write_all_configs,
    write_vip_config,
)

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def vlab(lab: Lab) -> Iterator[Lab]:
    write_all_configs(lab)
    install_generated_sudoers(lab, lab.nodes[0])
    for node in lab.nodes:  # `check` reads them; repmgrd is not started in this module
        wire_hooks(lab, node)
    yield lab


@pytest.fixture(autouse=True)
def no_vip_anywhere(vlab: Lab) -> Iterator[None]:
    """Each test starts and ends with the VIP on no node."""
    for node in vlab.nodes:
        vip(vlab, node, "release")
    yield
    for node in vlab.nodes:
        vip(vlab, node, "release")


def _wait_neigh(lab: Lab, mac: str, timeout: float = 5.0) -> None:
    lab.wait_for(lambda: lab.client_neigh_mac(VIP_IP) == mac, timeout,
                 what=f"client neighbour entry for the VIP to become {mac}")


def test_acquire_refuse_release_and_move(vlab: Lab) -> None:
    a, b = vlab.nodes[0], vlab.nodes[1]
    with VipSampler(vlab) as sampler:
        first = vip(vlab, a, "acquire")
        assert first.returncode == 0, first.stderr
        assert vlab.vip_holders() == [a.name]
        assert vlab.client_arping(VIP_IP) == [a.mac]

        # the client talks to the VIP, so it has a neighbour entry pointing at A
        vlab.run(None, ["ping", "-c", "1", "-W", "2", VIP_IP], user="root")
        assert vlab.client_neigh_mac(VIP_IP) == a.mac

        refused = vip(vlab, b, "acquire")
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        assert a.mac in refused.stderr.lower()
        assert len(refused.stderr.strip().splitlines()) == 1
        assert vlab.vip_holders() == [a.name]

        released = vip(vlab, a, "release")
        assert released.returncode == 0, released.stderr
        assert vlab.vip_holders() == []

        moved = vip(vlab, b, "acquire")
        assert moved.returncode == 0, moved.stderr
        assert vlab.vip_holders() == [b.name]
        # only B's gratuitous ARP can move the client's existing entry: it sends nothing itself
        _wait_neigh(vlab, b.mac)
        assert vlab.client_arping(VIP_IP) == [b.mac]
    sampler.assert_never_two()


def test_double_acquire_and_double_release_are_no_ops(vlab: Lab) -> None:
    a = vlab.nodes[0]
    with VipSampler(vlab) as sampler:
        assert vip(vlab, a, "acquire").returncode == 0
        again = vip(vlab, a, "acquire")
        assert again.returncode == 0, again.stderr
        assert "already held" in again.stdout
        assert vlab.addresses(a).count("192.0.2.115/24") == 1
        assert vip(vlab, a, "release").returncode == 0
        twice = vip(vlab, a, "release")
        assert twice.returncode == 0, twice.stderr
        assert "nothing to do" in twice.stdout
        assert vlab.vip_holders() == []
    sampler.assert_never_two()


def test_release_stops_a_running_announcement(vlab: Lab) -> None:
    """After release, no gratuitous ARP may still claim the VIP for this node."""
    a, b = vlab.nodes[0], vlab.nodes[1]
    assert vip(vlab, a, "acquire").returncode == 0
    assert vip(vlab, a, "release").returncode == 0
    assert vip(vlab, b, "acquire").returncode == 0
    _wait_neigh(vlab, b.mac)
    time.sleep(2.5)  # longer than A's announcement would have lasted (3 packets, 1 s apart)
    assert vlab.client_neigh_mac(VIP_IP) == b.mac


def test_direct_mode_as_root_needs_no_sudo(vlab: Lab) -> None:
    a = vlab.nodes[0]
    result = vip(vlab, a, "acquire", user="root")
    assert result.returncode == 0, result.stderr
    assert vlab.vip_holders() == [a.name]
    assert vlab.client_arping(VIP_IP) == [a.mac]


def test_forced_acquire_is_possible_but_named(vlab: Lab) -> None:
    a, b = vlab.nodes[0], vlab.nodes[1]
    assert vip(vlab, a, "acquire").returncode == 0
    forced = vip(vlab, b, "acquire", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "forced" in forced.stdout and a.mac in forced.stdout.lower()


def test_generated_sudoers_allows_nothing_else(vlab: Lab) -> None:
    a = vlab.nodes[0]
    name = f"{vlab.prefix}-x"
    denied = vlab.run(a, ["sudo", "-n", "ip", "netns", "add", name], check=False)
    assert denied.returncode != 0
    assert name not in vlab.run(a, ["ip", "netns", "list"], user="root").stdout
    shell = vlab.run(a, ["sudo", "-n", "/usr/sbin/ip", "netns", "exec", name, "/bin/sh"],
                     check=False)
    assert shell.returncode != 0
    other = vlab.run(a, ["sudo", "-n", "/usr/sbin/ip", "-4", "address", "add", "192.0.2.200/24",
                         "dev", "eth0"], check=False)
    assert other.returncode != 0
    assert "192.0.2.200/24" not in vlab.addresses(a)


def test_check_passes_on_a_healthy_node(vlab: Lab) -> None:
    result = vip(vlab, vlab.nodes[1], "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    assert "ssh node1" in result.stdout and "ssh node3" in result.stdout
    assert "sudo rule" in result.stdout


def test_check_names_broken_ssh(vlab: Lab) -> None:
    node3 = vlab.nodes[2]
    vlab.link_down(node3)
    try:
        result = vip(vlab, vlab.nodes[0], "check")
    finally:
        vlab.link_up(node3)
    assert result.returncode == 1
    failing = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failing and all("ssh node3" in line for line in failing), result.stdout


def test_check_names_broken_sudo(vlab: Lab) -> None:
    a = vlab.nodes[0]
    broken = write_vip_config(vlab, a, extra="", address="192.0.2.116/24")  # rules are for .115
    try:
        result = vip(vlab, a, "check", config=broken)
    finally:
        write_vip_config(vlab, a)
    assert result.returncode == 1
    failing = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failing and all("sudo rule" in line for line in failing), result.stdout
    assert "repmgr-vip sudoers" in failing[0]


@pytest.mark.parametrize(
    ("what", "config_text"),
    [
        ("VIP without prefix", 'address = "192.0.2.115"'),
        ("missing interface", 'address = "192.0.2.115/24"\ninterface = "eth9"'),
        ("unknown key", 'address = "192.0.2.115/24"\nannounce_cout = 5'),
        ("VIP is the node address", 'address = "192.0.2.11/24"'),
    ],
)
def test_bad_config_changes_nothing_on_the_host(vlab: Lab, what: str, config_text: str) -> None:
    a = vlab.nodes[0]
    assert vip(vlab, a, "acquire").returncode == 0
    before = vlab.addresses(a)
    bad = a.dir / "bad.toml"
    lines = [f'repmgr_config = "{a.repmgr_conf}"', "[vip]", config_text]
    if "interface" not in config_text:
        lines.append('interface = "eth0"')
    bad.write_text("\n".join(lines) + "\n")
    bad.chmod(0o644)
    for command in ("release", "acquire"):
        result = vip(vlab, a, command, config=bad)
        assert result.returncode == 2, (what, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert vlab.addresses(a) == before
