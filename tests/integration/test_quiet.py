"""A quiet steady state: daemons on every node start no PostgreSQL backend once warm, fork
no helper process per cycle, and get their kept connections back after a node's PostgreSQL
restarts."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.procwatch import count_forks
from lab import Lab, Node, VipSampler
from tests.integration.vipconf import hooked_cluster, metrics, start_daemon, stop_daemon

pytestmark = pytest.mark.lab

SESSIONS_SQL = "SELECT COALESCE(sum(sessions), 0) FROM pg_stat_database"
WINDOW = 20.0
# repmgrd itself starts about one backend per node per second (its own checks, even with
# connection_check_type=query) and each window's first psql read is counted too: so the lab
# is measured without daemons first, and the daemons may add no more than jitter to that.
# (Daemons that connect per query add about 4 per node per second at 3 nodes: 80 here.)
JITTER = 4
FORK_WINDOW = 10.0
# what a warm daemon may start: nothing (the SSH keeper checks its masters in-process, and
# asks `ssh -G` once per peer at start-up); never a process per cycle (`ip`, `arping`, sudo)
ALLOWED_PROGRAMS: set[str] = set()


def _sessions(lab: Lab) -> dict[str, int]:
    """pg_stat_database.sessions summed per node: backends started since the node's start."""
    with ThreadPoolExecutor(max_workers=len(lab.nodes)) as pool:
        values = pool.map(lambda n: int(lab.psql(n, SESSIONS_SQL, dbname="postgres")),
                          lab.nodes)
        return dict(zip([n.name for n in lab.nodes], values, strict=True))


def _new_sessions(lab: Lab, seconds: float) -> dict[str, int]:
    before = _sessions(lab)
    time.sleep(seconds)
    after = _sessions(lab)
    return {name: after[name] - before[name] for name in before}


def _peers_reachable(lab: Lab, node: Node) -> int | None:
    """The daemon's repmgr_vip_peers_reachable gauge, from inside the node's namespace."""
    found = re.search(r"^repmgr_vip_peers_reachable (\S+)$", metrics(lab, node), re.M)
    return int(float(found.group(1))) if found else None


def _wait(lab: Lab, what: str, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    lab.wait_for(predicate, timeout, interval=0.2, what=what)


def test_daemons_start_no_backend_in_steady_state_and_reconnect_after_restart(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    for node in lab.nodes:
        # repmgrd's default check (ping) starts a backend per node per second: the lab's own
        # noise. `query` checks on repmgrd's open connection, so what is left is ours.
        lab.set_repmgr_conf(node, "connection_check_type", "query", quote=False)
    hooked_cluster(lab)
    lab.wait_for(lambda: lab.vip_holders() == ["node1"], 30, what="VIP on node1")
    time.sleep(2.0)
    lab_only = _new_sessions(lab, WINDOW)
    print(f"new sessions in {WINDOW:g} s without daemons: {lab_only}")
    daemons = [start_daemon(lab, node) for node in lab.nodes]
    try:
        _wait(lab, "every daemon sees both peers",
              lambda: all(_peers_reachable(lab, n) == 2 for n in lab.nodes))
        assert lab.vip_holders() == ["node1"]
        time.sleep(3.0)  # the node list re-read after the peers first answered
        grown = _new_sessions(lab, WINDOW)
        print(f"new sessions in {WINDOW:g} s with daemons running: {grown}")
        assert all(grown[n] <= lab_only[n] + JITTER for n in grown), (grown, lab_only)
        # a fork per cycle cost each daemon about 1.4 % of a core (strace: a lab prerequisite)
        with ThreadPoolExecutor(max_workers=len(daemons)) as pool:
            started = list(pool.map(lambda p: count_forks(p.pid, FORK_WINDOW), daemons))
        print(f"processes started in {FORK_WINDOW:g} s: {started}")
        for counted in started:
            assert "error" not in counted, counted
            assert set(counted["programs"]) <= ALLOWED_PROGRAMS, counted
            assert counted["forks"] <= 2 * (len(lab.nodes) - 1), counted
        # what they use instead: one long-lived session from each daemon (2 peers + its own)
        for node in lab.nodes:
            kept = lab.psql(node, "SELECT count(*) FROM pg_stat_activity WHERE application_name"
                            f" = 'repmgr-vip' AND backend_start < now() - '{WINDOW:g} s'::interval",
                            dbname="postgres")
            assert int(kept) >= 3, (node.name, kept)

        standby = lab.node("node3")
        with VipSampler(lab) as sampler:
            lab.stop_postgres(standby)
            _wait(lab, "node3's peers see it down", lambda: all(
                _peers_reachable(lab, n) == 1 for n in lab.nodes if n is not standby))
            lab.start_postgres(standby)
            _wait(lab, "every daemon sees both peers again",
                  lambda: all(_peers_reachable(lab, n) == 2 for n in lab.nodes))
            time.sleep(2.0)
        assert sampler.samples and not sampler.errors
        assert {h for _, h in sampler.samples} == {("node1",)}
        assert all(proc.poll() is None for proc in daemons)
        # reconnected once, then quiet again
        grown = _new_sessions(lab, WINDOW)
        print(f"new sessions in {WINDOW:g} s after node3's restart: {grown}")
        assert all(grown[n] <= lab_only[n] + JITTER for n in grown), (grown, lab_only)
    finally:
        for proc in daemons:
            if proc.poll() is None:
                stop_daemon(proc)
