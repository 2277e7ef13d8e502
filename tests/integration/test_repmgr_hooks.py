"""repmgr integration end to end: real repmgrd, real failovers, a sampler watching every node.

No test passes if at any sampled instant two nodes hold the VIP (on a link that is up).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from lab import VIP_IP, Lab, Node, VipSampler
from tests.integration.vipconf import hooked_cluster, journal_entries, vip, vip_log

pytestmark = pytest.mark.lab

FAILOVER_TIMEOUT = 60.0


def _client_sees_primary(lab: Lab) -> bool:
    """A client connecting through the VIP reaches a node that is not in recovery."""
    result = lab.client_psql("SELECT pg_is_in_recovery()", check=False, timeout=5)
    return result.returncode == 0 and result.stdout.strip() == "f"


def _repmgrd_running(lab: Lab, node: Node) -> bool:
    try:
        pid = int(node.repmgrd_pid_file.read_text().split()[0])
        return b"repmgrd" in open(f"/proc/{pid}/cmdline", "rb").read()
    except (OSError, ValueError, IndexError):
        return False


def _upstream_of(lab: Lab, node: Node) -> str | None:
    out = lab.psql(node, "SELECT conninfo FROM pg_stat_wal_receiver", dbname="postgres")
    match = re.search(r"host=(\S+)", out)
    return match.group(1) if match else None


def _registered_primary(lab: Lab, node: Node) -> str:
    return lab.psql(node, "SELECT node_name FROM repmgr.nodes WHERE type = 'primary' AND active")


def _wait(lab: Lab, what: str, predicate: Callable[[], bool], timeout: float = FAILOVER_TIMEOUT
          ) -> float:
    started = time.monotonic()
    lab.wait_for(predicate, timeout, interval=0.05, what=what)
    return time.monotonic() - started


def test_daemon_start_puts_vip_on_primary_only(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    with VipSampler(lab) as sampler:
        hooked_cluster(lab)
        assert lab.vip_holders() == ["node1"]
        assert all(_repmgrd_running(lab, n) for n in lab.nodes)
        assert lab.client_arping(VIP_IP) == [lab.nodes[0].mac]
        assert _client_sees_primary(lab)
        # idempotent: a second start changes nothing and starts no second repmgrd
        pids = [n.repmgrd_pid_file.read_text().split()[0] for n in lab.nodes]
        for node in lab.nodes:
            again = vip(lab, node, "start-repmgrd")
            assert again.returncode == 0, again.stderr
            assert len(again.stdout.strip().splitlines()) == 1
        assert [n.repmgrd_pid_file.read_text().split()[0] for n in lab.nodes] == pids
        assert lab.vip_holders() == ["node1"]
    sampler.assert_never_two()


def test_failover_old_host_alive(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    hooked_cluster(lab)
    node1, node2, node3 = lab.nodes
    with VipSampler(lab) as sampler:
        lab.kill_postgres(node1)
        _wait(lab, "node2 promoted", lambda: lab.is_in_recovery(node2) is False)
        _wait(lab, "VIP on node2", lambda: lab.vip_holders() == ["node2"], 20)
        assert VIP_IP not in " ".join(lab.addresses(node1))
        _wait(lab, "node3 follows node2", lambda: _upstream_of(lab, node3) == node2.ip)
        _wait(lab, "client reaches the new primary", lambda: _client_sees_primary(lab), 20)
        assert lab.client_arping(VIP_IP) == [node2.mac]
    sampler.assert_never_two()
    verdicts = journal_entries(node2, source="promote", action="acquire")
    assert any("node1" in e["inputs"]["released"] for e in verdicts if "inputs" in e), verdicts
    # journaled once the releases asked after the add were waited for (SETTLE_WAIT)
    _wait(lab, "node2's promote hook journaled the VIP held", lambda: bool(journal_entries(
        node2, source="promote", action="acquire", outcome="held")), 10)


def test_failover_old_host_gone_does_not_wait_for_ssh(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    hooked_cluster(lab, "[fencing]\nssh_connect_timeout = 8\nssh_command_timeout = 10\n")
    node1, node2, _ = lab.nodes
    with VipSampler(lab) as sampler:
        lab.link_down(node1)
        _wait(lab, "node2 promoted", lambda: lab.is_in_recovery(node2) is False)
        _wait(lab, "VIP on node2", lambda: lab.vip_holders() == ["node2"], 20)
        _wait(lab, "client reaches the new primary", lambda: _client_sees_primary(lab), 20)
    sampler.assert_never_two()
    # the promote hook's fencing verdict in the journal: node1 was neither confirmed nor
    # waited for, and the round ended well before the 8 s SSH connect timeout
    verdicts = [e for e in journal_entries(node2, source="promote", action="acquire")
                if "fencing_ms" in e.get("inputs", {})]
    assert verdicts, vip_log(node2)
    inputs = verdicts[-1]["inputs"]
    assert "node1" in inputs["unconfirmed"] and "node1" not in inputs["released"], inputs
    assert inputs["fencing_ms"] < 8000, "the VIP step waited out the SSH timeout"


def test_hung_old_host_without_fence_command_refuses(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    hooked_cluster(lab, "[fencing]\nssh_connect_timeout = 2\nssh_command_timeout = 4\n")
    node1, node2, node3 = lab.nodes
    with VipSampler(lab) as sampler:
        lab.freeze(node1)
        try:
            _wait(lab, "a refused promotion in node2's or node3's journal",
                  lambda: bool(journal_entries(node2, source="promote", action="refuse")
                               + journal_entries(node3, source="promote", action="refuse")))
            time.sleep(5)  # and nothing else happens: no promotion, no second holder
            assert lab.is_in_recovery(node2) is True
            assert lab.is_in_recovery(node3) is True
        finally:
            lab.thaw(node1)
    sampler.assert_never_two()


def test_hung_old_host_with_fence_command_moves(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    fence = f"/usr/bin/sudo -n /usr/sbin/ip -n {lab.bridge_ns} link set v{{node_id}} down"
    rules = "".join(
        f"postgres ALL=(root) NOPASSWD: /usr/sbin/ip -n {lab.bridge_ns} "
        f"link set v{n.node_id} down\n" for n in lab.nodes)
    hooked_cluster(lab, "[fencing]\nssh_connect_timeout = 2\nssh_command_timeout = 4\n"
                   f'fence_command = "{fence}"\n')
    # the lab's "IPMI": only these exact commands, next to the generated rules
    sudoers = vip(lab, lab.nodes[0], "sudoers").stdout
    lab.install_sudoers(sudoers + rules)
    node1, node2, _ = lab.nodes
    with VipSampler(lab) as sampler:
        lab.freeze(node1)
        try:
            _wait(lab, "node2 promoted", lambda: lab.is_in_recovery(node2) is False)
            _wait(lab, "VIP on node2", lambda: lab.vip_holders() == ["node2"], 20)
            assert lab.client_arping(VIP_IP) == [node2.mac]
        finally:
            lab.thaw(node1)
    sampler.assert_never_two()
    assert any("node1" in e["inputs"].get("fenced", [])
               for e in journal_entries(node2, source="promote") if "inputs" in e)


def test_switchover_and_rejoin(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    hooked_cluster(lab)
    node1, node2, node3 = lab.nodes
    with VipSampler(lab) as sampler:
        result = lab.repmgr(node2, "standby", "switchover", "--siblings-follow",
                            "--always-promote", check=False, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
        assert lab.is_in_recovery(node2) is False
        _wait(lab, "VIP on node2 only", lambda: lab.vip_holders() == ["node2"], 20)
        _wait(lab, "node1 in recovery", lambda: lab.is_in_recovery(node1) is True, 30)
        _wait(lab, "node3 follows node2", lambda: _upstream_of(lab, node3) == node2.ip)
        assert _client_sees_primary(lab)
    sampler.assert_never_two()
    # the promotion event itself moved the VIP (fencing proved it free after the release)
    assert journal_entries(node2, source="event standby_promote", action="acquire",
                           outcome="held"), vip_log(node2)


def test_rejoin_after_failover_keeps_vip_off(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    hooked_cluster(lab)
    node1, node2, _ = lab.nodes
    with VipSampler(lab) as sampler:
        lab.kill_postgres(node1)
        _wait(lab, "VIP on node2", lambda: lab.vip_holders() == ["node2"])
        _wait(lab, "repmgr metadata names node2 primary", lambda: _registered_primary(lab, node2)
              == "node2")
        # pg_rewind reads the new timeline from the control file: the promote hook's own
        # CHECKPOINT (fencing.checkpoint_after_promote) writes it, no DBA step needed
        _wait(lab, "the promote hook's CHECKPOINT", lambda: bool(journal_entries(
            node2, source="promote", action="checkpoint", outcome="done")), 30)
        result = lab.repmgr(node1, "node", "rejoin", "-d", node2.conninfo, "--force-rewind",
                            check=False, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        _wait(lab, "node1 in recovery", lambda: lab.is_in_recovery(node1) is True, 30)
        assert lab.vip_holders() == ["node2"]
    sampler.assert_never_two()
    assert journal_entries(node1, source="event node_rejoin", action="release"), vip_log(node1)
