"""The read-only replica VIP in the lab: real repmgrd, the daemon on every node (as the unit
runs it), a sampler on each VIP; the replica VIP stays on one streaming, recent standby."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from lab import Lab, Node, VipSampler
from tests.integration.vipconf import hooked_cluster, start_daemon, stop_daemon, vip_log

pytestmark = pytest.mark.lab

REPLICA = "192.0.2.116/24"
REPLICA_IP = "192.0.2.116"
MOVE_TIMEOUT = 30.0


def _wait(lab: Lab, what: str, predicate: Callable[[], bool], timeout: float = MOVE_TIMEOUT
          ) -> float:
    started = time.monotonic()
    lab.wait_for(predicate, timeout, interval=0.1, what=what)
    return time.monotonic() - started


def _reads_standby(lab: Lab) -> bool:
    """A client reading through the replica VIP reaches a node in recovery (and the replica
    VIP is not on the node that holds the primary VIP)."""
    assert set(lab.vip_holders(REPLICA_IP)).isdisjoint(lab.vip_holders())
    result = lab.client_psql("SELECT pg_is_in_recovery()", host=REPLICA_IP, check=False,
                             timeout=5)
    return result.returncode == 0 and result.stdout.strip() == "t"


def _holder(lab: Lab) -> list[str]:
    return lab.vip_holders(REPLICA_IP)


def _primary(lab: Lab) -> Node | None:
    return next((n for n in lab.nodes if lab.is_in_recovery(n) is False), None)


def test_replica_vip_follows_a_healthy_standby(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    hooked_cluster(lab, f'[replica_vip]\naddress = "{REPLICA}"\nmax_lag_bytes = 1048576\n')
    node1, node2, node3 = lab.nodes
    daemons = {n.name: start_daemon(lab, n) for n in lab.nodes}
    figures = []
    try:
        with VipSampler(lab, ip=REPLICA_IP) as replica, VipSampler(lab) as primary:
            _wait(lab, "replica VIP on node2 (first standby by id)",
                  lambda: _holder(lab) == ["node2"])
            assert _reads_standby(lab)

            lab.stop_postgres(node2)  # the holder's PostgreSQL stops
            figures.append(("stop", _wait(lab, "replica VIP moves to node3",
                                          lambda: _holder(lab) == ["node3"])))
            assert _reads_standby(lab)
            lab.start_postgres(node2)
            _wait(lab, "node2 streams again", lambda: lab.streaming_count(node1) == 2)
            time.sleep(3)
            assert _holder(lab) == ["node3"]  # the holder keeps it while eligible: no flap

            lab.psql(node3, "SELECT pg_wal_replay_pause()", dbname="postgres")
            lab.psql(node1, "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad "
                     "FROM generate_series(1, 20000) g", dbname="postgres")
            figures.append(("lag", _wait(lab, "replica VIP leaves the lagging node3",
                                         lambda: _holder(lab) == ["node2"])))
            assert _reads_standby(lab)
            lab.psql(node3, "SELECT pg_wal_replay_resume()", dbname="postgres")

            assert _holder(lab) == ["node2"]
            lab.kill_postgres(node1)  # failover: node2 (the holder) or node3 is promoted
            _wait(lab, "a standby promoted", lambda: _primary(lab) not in (None, node1), 60)
            new = _primary(lab)
            assert new is not None
            other = node3 if new is node2 else node2
            figures.append(("promotion", _wait(
                lab, f"replica VIP on {other.name}, the remaining standby",
                lambda: _holder(lab) == [other.name], 60)))
            _wait(lab, "reads through the replica VIP reach a standby",
                  lambda: _reads_standby(lab), 20)
            assert _holder(lab) != [new.name]
            if new is node2:  # the promote hook gave the replica VIP up before the VIP
                assert "replica VIP 192.0.2.116/24 released before" in vip_log(node2)
            figures.append((f"promoted {new.name}", 0.0))
            stop_daemon(daemons[other.name])  # only the daemon moves it: stopping gives it up
            _wait(lab, "replica VIP released when its holder's daemon stops",
                  lambda: _holder(lab) == [], 15)
        replica.assert_never_two()
        primary.assert_never_two()
    finally:
        for proc in daemons.values():
            if proc.poll() is None:
                stop_daemon(proc)
    print("\nreplica VIP moved: " + ", ".join(f"{what} {s:.2f} s" for what, s in figures))
