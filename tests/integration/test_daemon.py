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

from tests.integration.vipconf import (
    hooked_cluster,
    start_daemon,
    stop_daemon,
    vip,
    vip_log,
    write_vip_config,
)
from tests.lab.lab import VIP, VIP_IP, Lab, Node, VipSampler

pytestmark = pytest.mark.lab


def _has_vip(lab: Lab, node: Node) -> bool:
    return VIP in lab.addresses(node)


def _wait(lab: Lab, what: str, predicate: Callable[[], bool], timeout: float = 60.0) -> float:
    started = time.monotonic()
    lab.wait_for(predicate, timeout, interval=0.05, what=what)
    return time.monotonic() - started


def _never_during(lab: Lab, predicate: Callable[[], bool], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert not predicate()
        time.sleep(0.05)


def _metrics(lab: Lab, node: Node) -> str:
    """The node's Prometheus endpoint as seen from inside its namespace ("" if it is not up)."""
    python = "/usr/bin/python3"  # stdlib only; REPMGR_VIP may be the package's, with no venv
    get = ("import urllib.request;print(urllib.request.urlopen("
           "'http://127.0.0.1:9853/metrics', timeout=5).read().decode())")
    fetch = lab.run(node, [python, "-c", get], check=False)
    return fetch.stdout if fetch.returncode == 0 else ""


class Cluster:
    """A lab with hooks wired, repmgrd started, and the daemon on every node."""

    def __init__(self, lab: Lab, extra: str = "") -> None:
        self.lab = lab
        hooked_cluster(lab, extra)
        self.daemons = {n.name: start_daemon(lab, n) for n in lab.nodes}
        _wait(lab, "every daemon has run a cycle", lambda: all(
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
        released_after = _wait(lab, "node1 releases the VIP itself",
                               lambda: not _has_vip(lab, node1), 15)
        _wait(lab, "node2 promoted and holding", lambda: lab.vip_holders() == ["node2"]
              and lab.is_in_recovery(node2) is False)
        lab.link_up(node1)
        _never_during(lab, lambda: _has_vip(lab, node1), 8.0)
        assert lab.vip_holders() == ["node2"]
    sampler.assert_never_two()
    return released_after


def test_partitioned_primary_releases_and_never_comes_back(cluster3: Cluster) -> None:
    released_after = _partition_primary_then_heal(cluster3.lab)
    # isolation grace is half of repmgr's 3 x 1 s detection: 1.5 s, plus cycles
    assert released_after < 5.0, released_after
    assert "isolated" in vip_log(cluster3.lab.nodes[0])


def test_vip_removed_by_hand_comes_back(cluster3: Cluster) -> None:
    lab = cluster3.lab
    node1 = lab.nodes[0]
    lab.run(node1, ["ip", "-4", "address", "del", VIP, "dev", "eth0"], user="root")
    back = _wait(lab, "VIP re-added on node1", lambda: _has_vip(lab, node1), 10)
    assert back < 2.5, f"VIP came back after {back:.2f} s (period 1 s)"
    _wait(lab, "client sees node1's MAC", lambda: lab.client_arping(VIP_IP) == [node1.mac], 5)


def test_daemon_kill_and_restart_does_not_flap(cluster3: Cluster) -> None:
    lab = cluster3.lab
    node1 = lab.nodes[0]
    cluster3.daemons["node1"].kill()
    cluster3.daemons["node1"].wait()
    cluster3.daemons["node1"] = start_daemon(lab, node1)
    _never_during(lab, lambda: not _has_vip(lab, node1), 6.0)
    assert "released" not in vip_log(node1).split("daemon started")[-1]


def test_metrics_status_and_sigterm(cluster3: Cluster) -> None:
    lab = cluster3.lab
    node1, node2, _ = lab.nodes
    _wait(lab, "metrics with both peers reachable",
          lambda: "repmgr_vip_peers_reachable 2.0" in _metrics(lab, node1), 10)
    fetch = _metrics(lab, node1)
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
    assert _has_vip(lab, node1)


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


def test_local_postgres_stopped_with_repmgrd_paused(cluster3: Cluster) -> None:
    lab = cluster3.lab
    node1 = lab.nodes[0]
    lab.repmgr(node1, "daemon", "pause")
    with VipSampler(lab) as sampler:
        lab.stop_postgres(node1)
        gone = _wait(lab, "VIP released on node1", lambda: not _has_vip(lab, node1), 10)
        lab.start_postgres(node1)
        back = _wait(lab, "VIP back on node1", lambda: _has_vip(lab, node1), 15)
    sampler.assert_never_two()
    assert gone < 3.0 and back < 5.0, (gone, back)
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
    _never_during(lab, lambda: _has_vip(lab, node1), 5.0)
    lab.start_postgres(node2)
    lab.start_postgres(node3)
    _wait(lab, "VIP back once the standbys are back", lambda: _has_vip(lab, node1), 20)
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

    _wait(lab, "the restarted daemon holds the VIP", new_daemon_cycled, 15)
    cluster3.daemons["node1"].send_signal(signal.SIGINT)
    assert cluster3.daemons["node1"].wait(timeout=10) == 0
    assert not _has_vip(lab, node1)
    assert "released the VIP on stop (daemon.on_stop = release)" in vip_log(node1)


def test_conflict_is_reported_and_fenced(cluster3: Cluster) -> None:
    """Someone adds the VIP by hand on a standby whose daemon is stopped: the holder notices
    another MAC answering, says so loudly (log, metric) and has the other node release it."""
    lab = cluster3.lab
    node1, node2, _ = lab.nodes
    stop_daemon(cluster3.daemons["node2"])
    lab.run(node2, ["ip", "-4", "address", "add", VIP, "dev", "eth0"], user="root")
    _wait(lab, "node2's copy fenced away by node1", lambda: not _has_vip(lab, node2), 30)
    _wait(lab, "node1 logs the conflict fencing",
          lambda: "conflict fencing: released on" in vip_log(node1), 15)
    assert _has_vip(lab, node1)
    log = vip_log(node1)
    assert "VIP CONFLICT" in log and node2.mac in log, log
    metrics = _metrics(lab, node1)
    assert "repmgr_vip_conflicts_total 0.0" not in metrics
    assert 'repmgr_vip_actions_total{action="fence"}' in metrics
