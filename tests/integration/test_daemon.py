"""The reconciling daemon on every node, with real repmgrd: partitions, hand-removed VIPs,
stopped PostgreSQL, daemon restarts. A sampler watches every node throughout."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from lab import VIP, VIP_IP, Lab, VipSampler
from tests.integration.vipconf import (
    has_vip,
    hooked_cluster,
    journal_entries,
    metrics,
    never_during,
    start_daemon,
    stop_daemon,
    vip,
    vip_log,
    wait_until,
    write_vip_config,
)

pytestmark = pytest.mark.lab










class Cluster:
    """A lab with hooks wired, repmgrd started, and the daemon on every node."""

    def __init__(self, lab: Lab, extra: str = "") -> None:
        self.lab = lab
        hooked_cluster(lab, extra)
        self.daemons = {n.name: start_daemon(lab, n) for n in lab.nodes}
        wait_until(lab, "every daemon has run a cycle", lambda: all(
            (n.dir / "repmgr-vip-daemon.json").exists() for n in lab.nodes), 30)
        assert lab.vip_holders() == ["node1"]

    def stop(self) -> None:
        for proc in self.daemons.values():
            if proc.poll() is None:
                stop_daemon(proc)


@pytest.fixture
def cluster3(lab_factory: Callable[..., Lab]) -> Iterator[Cluster]:
    cluster = Cluster(lab_factory(nodes=3))
    yield cluster
    cluster.stop()


def _partition_primary_then_heal(lab: Lab) -> float:
    """Cuts node1 off, waits for the failover to node2, heals; returns node1's release time."""
    node1, node2 = lab.nodes[0], lab.nodes[1]
    with VipSampler(lab) as sampler:
        lab.link_down(node1)
        released_after = wait_until(lab, "node1 releases the VIP itself",
                               lambda: not has_vip(lab, node1), 15)
        wait_until(lab, "node2 promoted and holding", lambda: lab.vip_holders() == ["node2"]
              and lab.is_in_recovery(node2) is False)
        lab.link_up(node1)
        never_during(lambda: has_vip(lab, node1), 8.0)
        assert lab.vip_holders() == ["node2"]
    sampler.assert_never_two()
    return released_after


def test_partitioned_primary_releases_and_never_comes_back(cluster3: Cluster) -> None:
    released_after = _partition_primary_then_heal(cluster3.lab)
    # isolation grace is half of repmgr's 3 x 1 s detection: 1.5 s, plus cycles
    assert released_after < 5.0, released_after
    # the journal shows why: node1 still held the VIP while it reached no peer
    node1 = cluster3.lab.nodes[0]
    alone = [e for e in journal_entries(node1, source="daemon", action="release")
             if e.get("inputs", {}).get("holds") and e["inputs"].get("peers")
             and all(str(v).startswith("unreachable") for v in e["inputs"]["peers"].values())]
    assert alone, vip_log(node1)


def test_vip_removed_by_hand_comes_back(cluster3: Cluster) -> None:
    lab = cluster3.lab
    node1 = lab.nodes[0]
    lab.run(node1, ["ip", "-4", "address", "del", VIP, "dev", "eth0"], user="root")
    back = wait_until(lab, "VIP re-added on node1", lambda: has_vip(lab, node1), 10)
    assert back < 2.5, f"VIP came back after {back:.2f} s (period 1 s)"
    wait_until(lab, "client sees node1's MAC", lambda: lab.client_arping(VIP_IP) == [node1.mac], 5)


def test_daemon_kill_and_restart_does_not_flap(cluster3: Cluster) -> None:
    lab = cluster3.lab
    node1 = lab.nodes[0]
    cluster3.daemons["node1"].kill()
    cluster3.daemons["node1"].wait()
    restarted = cluster3.daemons["node1"] = start_daemon(lab, node1)
    never_during(lambda: not has_vip(lab, node1), 6.0)
    new_daemon = journal_entries(node1, source="daemon", pid=restarted.pid)
    assert new_daemon, "the restarted daemon journaled no decision"  # the filter is not vacuous
    assert not [e for e in new_daemon if e["action"] == "release"], new_daemon


def test_metrics_status_and_sigterm(cluster3: Cluster) -> None:
    lab = cluster3.lab
    node1, node2, _ = lab.nodes
    wait_until(lab, "metrics with both peers reachable",
          lambda: "repmgr_vip_peers_reachable 2.0" in metrics(lab, node1), 10)
    fetch = metrics(lab, node1)
    assert "repmgr_vip_held 1.0" in fetch
    assert 'repmgr_vip_role{role="primary"} 1.0' in fetch
    assert "repmgr_vip_peers_reachable 2.0" in fetch
    status = vip(lab, node2, "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    rows = {r["node_name"]: r for r in json.loads(status.stdout)["nodes"]}
    assert rows["node1"]["holds_vip"] and rows["node1"]["role"] == "primary"
    assert not rows["node2"]["holds_vip"] and rows["node2"]["daemon"]
    assert json.loads(status.stdout)["conflicts"] == []
    # SIGTERM: the loop stops, the VIP stays (a manager restart must not cut clients)
    assert stop_daemon(cluster3.daemons["node1"]) == 0
    assert has_vip(lab, node1)


def test_sd_notify_readiness(cluster3: Cluster) -> None:
    lab = cluster3.lab
    node3 = lab.nodes[2]
    path = node3.dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        path.chmod(0o777)
        sock.settimeout(15)
        stop_daemon(cluster3.daemons["node3"])
        cluster3.daemons["node3"] = start_daemon(lab, node3, env={"NOTIFY_SOCKET": str(path)})
        messages = [sock.recv(4096).decode() for _ in range(2)]
    assert "READY=1" in messages
    assert any(m.startswith("STATUS=") and "standby" in m for m in messages)


KEEP_WHILE_DOWN = 6.0


@pytest.fixture
def keeping3(lab_factory: Callable[..., Lab]) -> Iterator[Cluster]:
    cluster = Cluster(lab_factory(nodes=3), f"[daemon]\nkeep_while_down = {KEEP_WHILE_DOWN}\n")
    yield cluster
    cluster.stop()


def test_local_postgres_stopped_with_repmgrd_paused(keeping3: Cluster) -> None:
    """No failover comes (repmgrd paused): the dead primary keeps the VIP for
    daemon.keep_while_down, so a client is refused at once instead of waiting on silence;
    then it lets go; PostgreSQL back, the VIP is back."""
    lab = keeping3.lab
    node1 = lab.nodes[0]
    lab.repmgr(node1, "daemon", "pause")
    with VipSampler(lab) as sampler:
        lab.stop_postgres(node1)
        stopped = time.monotonic()
        never_during(lambda: not has_vip(lab, node1), 3.0)
        asked = time.monotonic()
        refused = lab.client_psql("SELECT 1", timeout=5, check=False)
        answered_in = time.monotonic() - asked
        assert refused.returncode != 0 and answered_in < 0.5, (refused.stderr, answered_in)
        gone = wait_until(lab, "VIP released on node1", lambda: not has_vip(lab, node1), 15)
        held_for = time.monotonic() - stopped
        lab.start_postgres(node1)
        back = wait_until(lab, "VIP back on node1", lambda: has_vip(lab, node1), 15)
    sampler.assert_never_two()
    print(f"kept {held_for:.1f} s with PostgreSQL down (keep_while_down {KEEP_WHILE_DOWN:g}); "
          f"a client was refused in {answered_in * 1000:.0f} ms; back {back:.1f} s after start")
    assert KEEP_WHILE_DOWN - 0.5 <= held_for <= KEEP_WHILE_DOWN + 4.0, (held_for, gone)
    assert back < 5.0, back
    lab.repmgr(node1, "daemon", "unpause")


def test_two_nodes_without_witness_partition_then_heal(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=2)
    cluster = Cluster(lab)
    try:
        _partition_primary_then_heal(lab)
    finally:
        cluster.stop()


def test_fence_self_from_child_nodes_disconnect(cluster3: Cluster) -> None:
    """The repmgr hook releases and the daemon does not take the VIP back while alone."""
    lab = cluster3.lab
    node1, node2, node3 = lab.nodes
    lab.repmgr(node1, "daemon", "pause")
    lab.stop_postgres(node2)
    lab.stop_postgres(node3)
    result = vip(lab, node1, "fence-self")
    assert result.returncode == 0, result.stderr
    never_during(lambda: has_vip(lab, node1), 5.0)
    lab.start_postgres(node2)
    lab.start_postgres(node3)
    wait_until(lab, "VIP back once the standbys are back", lambda: has_vip(lab, node1), 20)
    lab.repmgr(node1, "daemon", "unpause")


def test_setpriv_is_available() -> None:
    assert subprocess.run(["/usr/bin/setpriv", "--help"], capture_output=True).returncode == 0


def test_sigint_with_on_stop_release_gives_the_vip_up(cluster3: Cluster) -> None:
    lab = cluster3.lab
    node1 = lab.nodes[0]
    stop_daemon(cluster3.daemons["node1"])
    write_vip_config(lab, node1, "[daemon]\non_stop = \"release\"\n")
    cluster3.daemons["node1"] = start_daemon(lab, node1)
    pid = cluster3.daemons["node1"].pid  # ip netns exec, setpriv and the script all exec

    def new_daemon_cycled() -> bool:
        try:
            state = json.loads((node1.dir / "repmgr-vip-daemon.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(state["pid"] == pid and state["holds_vip"])

    wait_until(lab, "the restarted daemon holds the VIP", new_daemon_cycled, 15)
    cluster3.daemons["node1"].send_signal(signal.SIGINT)
    assert cluster3.daemons["node1"].wait(timeout=10) == 0
    assert not has_vip(lab, node1)
    last = journal_entries(node1, source="daemon", pid=pid)[-1]
    assert (last["action"], last.get("outcome")) == ("release", "released"), last


def test_conflict_is_reported_and_fenced(cluster3: Cluster) -> None:
    """Someone adds the VIP by hand on a standby whose daemon is stopped: the holder notices
    another MAC answering, says so loudly (log, metric) and has the other node release it."""
    lab = cluster3.lab
    node1, node2, _ = lab.nodes
    stop_daemon(cluster3.daemons["node2"])
    lab.run(node2, ["ip", "-4", "address", "add", VIP, "dev", "eth0"], user="root")
    wait_until(lab, "node2's copy fenced away by node1", lambda: not has_vip(lab, node2), 30)
    wait_until(lab, "node1 journals its conflict fencing", lambda: any(
        node2.mac in e["inputs"]["answering"] and "node2" in e["inputs"]["released"]
        for e in journal_entries(node1, source="daemon", action="fence", alarm="conflict")), 15)
    assert has_vip(lab, node1)
    scraped = metrics(lab, node1)
    assert "repmgr_vip_conflicts_total 0.0" not in scraped
    assert 'repmgr_vip_actions_total{action="fence"}' in scraped
