"""IPv6 VIPs: neighbour discovery frames against frames the kernel sent, config parsing, and
the command lines (sudoers) for IPv6 and dual stack."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest

from repmgr_vip.adapters import ndp
from repmgr_vip.adapters.network import InterfaceState, PrivilegedCommands
from repmgr_vip.cli.main import main
from repmgr_vip.config.schema import load_config, render_toml
from repmgr_vip.core.errors import ExitCode
from repmgr_vip.testing import bpf_passes

MAC = bytes.fromhex("020000000701")
TARGET = ipaddress.IPv6Address("2001:db8::117")
# Captured on a veth in a namespace (Linux 6.18): the kernel's unsolicited advertisement after
# `ip -6 address add 2001:db8::117/64` with ndisc_notify=1, and its DAD solicitation (which
# carries an 8-byte nonce option, RFC 7527: enhanced DAD).
KERNEL_NA = bytes.fromhex(
    "33330000000102000000070186dd6000000000203aff20010db8000000000000000000000117"
    "ff0200000000000000000000000000018800effe2000000020010db8000000000000000000000117"
    "0201020000000701")
KERNEL_NS = bytes.fromhex(
    "3333ff00011702000000070186dd6000000000203aff00000000000000000000000000000000"
    "ff0200000000000000000001ff0001178700ccce0000000020010db8000000000000000000000117"
    "0e0190f4399ca558")
NONCE_OPTION = bytes.fromhex("0e0190f4399ca558")


def test_advertisement_is_byte_for_byte_the_kernels() -> None:
    assert ndp.advertisement_frame(MAC, TARGET) == KERNEL_NA


def test_solicitation_matches_the_kernels_dad_probe() -> None:
    """Ours has no nonce; with the kernel's nonce appended it is the kernel's frame."""
    group = ndp.solicited_node(TARGET)
    assert str(group) == "ff02::1:ff00:117"
    assert ndp.multicast_mac(group).hex() == "3333ff000117"
    with_nonce = ndp._frame(MAC, ndp.multicast_mac(group), ndp.UNSPECIFIED, group,
                            ndp.NEIGHBOR_SOLICITATION, b"\x00" * 4 + TARGET.packed + NONCE_OPTION)
    assert with_nonce == KERNEL_NS
    ours = ndp.solicitation_frame(MAC, TARGET)
    assert len(ours) == 14 + 40 + 24
    assert ours[22:38] == b"\x00" * 16  # from the unspecified address
    assert ndp.parse_nd(ours) == (ndp.NEIGHBOR_SOLICITATION, MAC, TARGET, None)


def test_the_probe_filter_passes_only_advertisements_of_the_target() -> None:
    """The kernel keeps every other IPv6 frame from the probe's socket: here the kernel's own
    solicitation, an advertisement of another address, one with a routed hop limit, an IPv4
    frame; the advertisement of the target passes (and parse_nd reads it)."""
    program = ndp.advertisement_filter(TARGET)
    other = ndp.advertisement_frame(MAC, ipaddress.IPv6Address("2001:db8::118"))
    forwarded = KERNEL_NA[:21] + b"\x40" + KERNEL_NA[22:]
    ipv4 = KERNEL_NA[:12] + b"\x08\x00" + KERNEL_NA[14:]
    assert bpf_passes(program, KERNEL_NA)
    assert [bpf_passes(program, f) for f in (KERNEL_NS, other, forwarded, ipv4,
                                             KERNEL_NA[:60])] == [False] * 5


def test_parse_reads_the_kernels_frames_and_rejects_damage() -> None:
    assert ndp.parse_nd(KERNEL_NA) == (ndp.NEIGHBOR_ADVERTISEMENT, MAC, TARGET, MAC)
    assert ndp.parse_nd(KERNEL_NS) == (ndp.NEIGHBOR_SOLICITATION, MAC, TARGET, None)
    bad_checksum = KERNEL_NA[:-1] + b"\x02"
    assert ndp.parse_nd(bad_checksum) is None
    forwarded = KERNEL_NA[:21] + b"\x40" + KERNEL_NA[22:]  # hop limit 64: not on-link
    assert ndp.parse_nd(forwarded) is None
    assert ndp.parse_nd(KERNEL_NA[:60]) is None


def test_checksum_of_a_message_with_its_checksum_is_zero() -> None:
    src = ipaddress.IPv6Address("2001:db8::117")
    message = KERNEL_NA[54:]
    assert ndp.checksum(src, ndp.ALL_NODES, message) == 0


def _config_text(repmgr_conf: Path, address: str, extra: str = "") -> str:
    return (f'repmgr_config = "{repmgr_conf}"\n\n[vip]\naddress = {address}\n'
            f'interface = "lo"\n{extra}')


def test_ipv6_and_dual_stack_config(tmp_path: Path, repmgr_conf: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(_config_text(repmgr_conf, '"2001:DB8::115/64"'))
    config = load_config(path)
    assert config.vip.cidr == "2001:db8::115/64"
    assert [a.version for a in config.vip.all] == [6]
    path.write_text(_config_text(repmgr_conf, '["192.0.2.115/24", "2001:db8::115/64"]'))
    config = load_config(path)
    assert [a.with_prefixlen for a in config.vip.all] == ["192.0.2.115/24", "2001:db8::115/64"]
    again = tomllib.loads(render_toml(config.values))
    assert again["vip"]["address"] == ["192.0.2.115/24", "2001:db8::115/64"]


BAD = [
    ("no prefix", '"2001:db8::115"'),
    ("prefix too long", '"2001:db8::115/129"'),
    ("link-local", '"fe80::115/64"'),
    ("multicast", '"ff02::1:ff00:115/64"'),
    ("loopback", '"::1/128"'),
    ("unspecified", '"::/64"'),
    ("IPv4-mapped", '"::ffff:192.0.2.115/96"'),
    ("duplicate", '["2001:db8::115/64", "2001:db8:0::115/64"]'),
    ("two IPv6", '["2001:db8::115/64", "2001:db8::116/64"]'),
    ("two IPv4", '["192.0.2.115/24", "192.0.2.116/24"]'),
    ("empty list", "[]"),
    ("list with a number", '["2001:db8::115/64", 3]'),
]


@pytest.mark.parametrize(("what", "value"), BAD, ids=[b[0] for b in BAD])
def test_bad_ipv6_input_exits_2_naming_the_key(
    what: str, value: str, tmp_path: Path, repmgr_conf: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(_config_text(repmgr_conf, value))
    assert main(["-c", str(path), "config"]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "vip.address" in err, (what, err)


def test_lease_is_refused_for_ipv6(tmp_path: Path, repmgr_conf: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(_config_text(repmgr_conf, '"2001:db8::115/64"', "lease = 5\n"))
    assert main(["-c", str(path), "config"]) == ExitCode.USAGE
    assert "vip.lease" in capsys.readouterr().err


def test_commands_for_dual_stack(tmp_path: Path, repmgr_conf: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(_config_text(repmgr_conf, '["2001:db8::115/64", "192.0.2.115/24"]'))
    commands = PrivilegedCommands.from_config(load_config(path))
    lines = [" ".join(line[1:]) for line in commands.all()]
    assert "-6 address add 2001:db8::115/64 dev lo" in lines
    assert "-6 address del 2001:db8::115/64 dev lo" in lines
    assert "-4 address add 192.0.2.115/24 dev lo" in lines
    assert any(line[0].endswith("arping") for line in commands.all())
    assert not any("nodad" in line for line in lines)  # sudo lets the kernel's DAD probe
    assert commands.add(nodad=True)[-1] == "nodad"


def test_sudoers_covers_every_address(tmp_path: Path, repmgr_conf: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(_config_text(repmgr_conf, '["192.0.2.115/24", "2001:db8::115/64"]'))
    assert main(["-c", str(path), "sudoers"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "address add 2001\\:db8\\:\\:115/64 dev lo" in out  # ':' escaped for sudoers
    assert "address add 192.0.2.115/24 dev lo" in out
    assert "*" not in out.replace("# ", "")


def test_state_compares_ipv6_spellings_and_ignores_tentative() -> None:
    state = InterfaceState(True, True, "02:00:00:00:07:01", ("2001:db8::115/64",),
                           ("2001:db8::116/64",))
    assert state.address_as("2001:DB8:0::115") == "2001:db8::115/64"
    assert state.address_as("2001:db8::116") is None
    assert state.present_as("2001:db8::116") == "2001:db8::116/64"
    assert state.held_map(["2001:db8::115/64", "2001:db8::116/64"]) == {
        "2001:db8::115/64": True, "2001:db8::116/64": False}
    assert state.holds_all(["2001:db8::115/64"])
    assert not state.holds_all(["2001:db8::115/64", "2001:db8::116/64"])  # tentative: not held


def test_kernel_dad_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"conf/eth9/accept_dad": 1, "conf/eth9/dad_transmits": 1,
              "conf/eth9/ndisc_notify": 0, "conf/all/ndisc_notify": 0,
              "conf/all/accept_dad": 0, "conf/eth9/router_solicitation_delay": 0,
              "neigh/eth9/retrans_time_ms": 200}
    monkeypatch.setattr(ndp, "_sysctl", values.get)
    problems = ndp.kernel_dad_problems("eth9")
    assert len(problems) == 1 and "ndisc_notify" in problems[0]
    assert ndp.kernel_dad_seconds("eth9") == pytest.approx(0.2)
    values["conf/eth9/ndisc_notify"] = 1
    assert ndp.kernel_dad_problems("eth9") == []


def test_metrics_label_every_address() -> None:
    from prometheus_client import generate_latest

    from repmgr_vip.app.metrics import Metrics

    metrics = Metrics("127.0.0.1", 0)
    metrics.addresses({"192.0.2.115/24": True, "2001:db8::115/64": False})
    text = generate_latest(metrics.registry).decode()
    assert 'repmgr_vip_address_held{address="192.0.2.115/24"} 1.0' in text
    assert 'repmgr_vip_address_held{address="2001:db8::115/64"} 0.0' in text


def test_status_shows_a_partly_held_dual_stack_vip_as_a_conflict() -> None:
    from repmgr_vip.app.status import NodeStatus, conflicts, render

    both = {"192.0.2.115/24": True, "2001:db8::115/64": True}
    part = {"192.0.2.115/24": False, "2001:db8::115/64": True}
    rows = [NodeStatus(1, "a", "primary", "primary", 1, True, True, True, "", both),
            NodeStatus(2, "b", "standby", "standby", 1, True, False, True, "", part)]
    found = conflicts(rows)
    assert any("2 nodes" in line for line in found), found
    assert "only 2001:db8::115" in render(rows, found)


class _FakeHost:
    """Interface state and privileged commands of a pretend host, for VipNetwork."""

    def __init__(self, dad_fails: bool) -> None:
        self.dad_fails = dad_fails
        self.usable: list[str] = []
        self.pending: list[str] = []
        self.ran: list[list[str]] = []

    def state(self) -> InterfaceState:
        return InterfaceState(True, True, "02:00:00:00:07:01", tuple(self.usable),
                              tuple(self.pending))

    def privileged(self, argv: list[str], timeout: float) -> object:
        import subprocess

        self.ran.append(argv)
        cidr = argv[4]
        if argv[3] == "add":
            (self.pending if argv[1] == "-6" and "nodad" not in argv else self.usable).append(
                cidr)
        elif argv[3] == "del":
            for bucket in (self.usable, self.pending):
                if cidr in bucket:
                    bucket.remove(cidr)
        return subprocess.CompletedProcess(argv, 0, "", "")


@pytest.mark.parametrize("dad_fails", [False, True], ids=["free", "in-use"])
def test_sudo_dual_stack_add_starts_dad_first_and_never_leaves_a_part(
        tmp_path: Path, repmgr_conf: Path, monkeypatch: pytest.MonkeyPatch,
        dad_fails: bool) -> None:
    from repmgr_vip.adapters.network import VipNetwork
    from repmgr_vip.core.errors import RefusedError

    path = tmp_path / "c.toml"
    path.write_text(_config_text(repmgr_conf, '["192.0.2.115/24", "2001:db8::115/64"]')
                    + '[privileges]\nmode = "sudo"\n')
    network = VipNetwork(load_config(path))
    host = _FakeHost(dad_fails)
    monkeypatch.setattr(network, "interface_state", host.state)
    monkeypatch.setattr(network, "_privileged", host.privileged)
    monkeypatch.setattr(ndp, "kernel_dad_problems", lambda interface: [])
    monkeypatch.setattr(ndp, "kernel_dad_seconds", lambda interface: 0.1)

    def dad_done(member: PrivilegedCommands) -> bool:
        if member.cidr in host.pending:
            host.pending.remove(member.cidr)
            if not host.dad_fails:
                host.usable.append(member.cidr)
        return host.dad_fails

    monkeypatch.setattr(network, "_dad_failed", dad_done)
    if dad_fails:
        with pytest.raises(RefusedError):
            network.add()
        assert host.usable == [] and host.pending == []
    else:
        assert network.add() is True
        assert sorted(host.usable) == ["192.0.2.115/24", "2001:db8::115/64"]
    adds = [argv[1] for argv in host.ran if argv[3] == "add"]
    assert adds == ["-6", "-4"]  # the kernel's DAD runs while IPv4 is added
    assert not any("nodad" in argv for argv in host.ran)
