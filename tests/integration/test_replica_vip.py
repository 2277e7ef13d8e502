"""The read-only replica VIP in the lab: real repmgrd, the daemon on every node (as the unit
runs it), a sampler on each VIP; the replica VIP stays on one streaming, recent standby, a
client reading through it only ever reaches a node in recovery, and it is never on two nodes.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from lab import VIP, Lab, Node, VipSampler
from tests.integration.test_quiet import JITTER, _new_sessions
from tests.integration.vipconf import hooked_cluster, metrics, start_daemon, stop_daemon, vip

pytestmark = pytest.mark.lab

REPLICA = "192.0.2.116/24"
REPLICA_IP = "192.0.2.116"
REPLICA6 = "2001:db8::116/64"
REPLICA6_IP = "2001:db8::116"
MOVE_TIMEOUT = 30.0
WINDOW = 20.0


def _wait(lab: Lab, what: str, predicate: Callable[[], bool], timeout: float = MOVE_TIMEOUT
          ) -> float:
    started = time.monotonic()
    lab.wait_for(predicate, timeout, interval=0.05, what=what)
    return time.monotonic() - started


class RecoveryReader:
    """A client in its own namespace connecting through the replica VIP again and again:
    what `pg_is_in_recovery()` said on every connection that worked ("t" or "f")."""

    def __init__(self, lab: Lab, ip: str = REPLICA_IP, pause: float = 0.1) -> None:
        self.lab = lab
        self.ip = ip
        self.pause = pause
        self.answers: list[tuple[float, str]] = []
        self.failures = 0
        self.crashed: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="reader")

    def __enter__(self) -> RecoveryReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:  # psql's own connect_timeout is 3 s: a hung attempt is a failed read
                    result = self.lab.client_psql("SELECT pg_is_in_recovery()", host=self.ip,
                                                  check=False, timeout=6)
                except subprocess.TimeoutExpired:
                    self.failures += 1
                    continue
                if result.returncode == 0:
                    self.answers.append((time.monotonic(), result.stdout.strip()))
                else:
                    self.failures += 1
                self._stop.wait(self.pause)
        except BaseException as exc:  # reported by the assertion: a dead reader proves nothing
            self.crashed = exc

    def assert_always_in_recovery(self) -> None:
        assert self.crashed is None, f"the reader stopped early: {self.crashed!r}"
        assert self.answers, "the reader never connected"
        wrong = [a for _, a in self.answers if a != "t"]
        assert not wrong, f"{len(wrong)} of {len(self.answers)} reads reached a primary"


def _holder(lab: Lab, ip: str = REPLICA_IP) -> list[str]:
    return lab.vip_holders(ip)


def _primary(lab: Lab) -> Node | None:
    return next((n for n in lab.nodes if lab.is_in_recovery(n) is False), None)


def _first(sampler: VipSampler, name: str) -> float | None:
    return next((t for t, h in sampler.samples if name in h), None)


def _last(sampler: VipSampler, name: str) -> float | None:
    return next((t for t, h in reversed(sampler.samples) if name in h), None)


def _start_repmgrd(lab: Lab) -> None:
    for node in lab.nodes:
        result = lab.repmgr(node, "daemon", "start", check=False, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_replica_vip_follows_a_healthy_standby(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    node1, node2, node3 = lab.nodes
    # node3 never wins an election: the kill -9 below promotes node2, the replica VIP's holder
    lab.set_repmgr_conf(node3, "priority", "0", quote=False)
    hooked_cluster(lab, f'[replica_vip]\naddress = "{REPLICA}"\nmax_lag_bytes = 1048576\n',
                   start=False)
    lab.psql(node1, "UPDATE repmgr.nodes SET priority = 0 WHERE node_name = 'node3'")
    _start_repmgrd(lab)
    daemons = {n.name: start_daemon(lab, n) for n in lab.nodes}
    figures = []
    try:
        with VipSampler(lab, ip=REPLICA_IP) as replica, VipSampler(lab) as primary:
            _wait(lab, "replica VIP on node2 (first standby by id)",
                  lambda: _holder(lab) == ["node2"])
            with RecoveryReader(lab) as reader:
                _wait(lab, "the reader connects", lambda: bool(reader.answers), 10)
                lab.stop_postgres(node2)  # the holder's PostgreSQL stops
                figures.append(("stop", _wait(lab, "replica VIP moves to node3",
                                              lambda: _holder(lab) == ["node3"])))
                lab.start_postgres(node2)
                _wait(lab, "node2 streams again", lambda: lab.streaming_count(node1) == 2)
                time.sleep(3)
                assert _holder(lab) == ["node3"]  # the holder keeps it while eligible: no flap

                lab.psql(node3, "SELECT pg_wal_replay_pause()", dbname="postgres")
                lab.psql(node1, "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad "
                         "FROM generate_series(1, 20000) g", dbname="postgres")
                figures.append(("lag", _wait(lab, "replica VIP leaves the lagging node3",
                                             lambda: _holder(lab) == ["node2"])))
                lab.psql(node3, "SELECT pg_wal_replay_resume()", dbname="postgres")
                time.sleep(2)
                assert _holder(lab) == ["node2"]

                lab.kill_postgres(node1)  # failover: node2, the holder, is promoted
                _wait(lab, "node2 promoted", lambda: _primary(lab) is node2, 60)
                promoted = time.monotonic()
                seen: dict[str, float] = {}

                def moved() -> bool:  # and when node3 first streamed from node2 (repmgr's part)
                    now = time.monotonic()
                    if "follow" not in seen and lab.streaming_count(node2) >= 1:
                        seen["follow"] = now
                    return _holder(lab) == ["node3"]

                _wait(lab, "replica VIP on node3, the remaining standby", moved, 60)
                figures.append(("promotion", time.monotonic() - promoted))
                followed = seen.get("follow", time.monotonic())
                figures.append(("of which after node3 streamed from node2",
                                time.monotonic() - followed))
                _wait(lab, "primary VIP on node2", lambda: lab.vip_holders() == ["node2"], 30)
                time.sleep(2)
            reader.assert_always_in_recovery()
            # the promoted node gave the replica VIP up before it took the primary VIP
            gave_up, took = _last(replica, "node2"), _first(primary, "node2")
            assert gave_up is not None and took is not None and gave_up < took, (gave_up, took)
            stop_daemon(daemons["node3"])  # only the daemon places it: stopping gives it up
            _wait(lab, "replica VIP released when its holder's daemon stops",
                  lambda: _holder(lab) == [], 15)
        replica.assert_never_two()
        primary.assert_never_two()
    finally:
        for proc in daemons.values():
            if proc.poll() is None:
                stop_daemon(proc)
    print(f"\nreads through the replica VIP: {len(reader.answers)} all in recovery, "
          f"{reader.failures} failed connections")
    print("replica VIP moved: " + ", ".join(f"{what} {s:.2f} s" for what, s in figures))


def test_replica_vip_dual_stack_kept_connections_and_fencing_a_dead_daemon(
        lab_factory: Callable[..., Lab]) -> None:
    """Dual-stack replica VIP (IPv4 + IPv6); the daemons read the cluster on their kept
    connections (no new backend per period); a holder whose daemon was killed loses it to
    the next standby through the fencing round over SSH."""
    lab = lab_factory(nodes=3)
    for node in lab.nodes:
        lab.set_repmgr_conf(node, "connection_check_type", "query", quote=False)
    hooked_cluster(lab, f'[replica_vip]\naddress = ["{REPLICA}", "{REPLICA6}"]\n')
    node2, node3 = lab.node("node2"), lab.node("node3")
    lab.wait_for(lambda: lab.vip_holders() == ["node1"], 30, what="VIP on node1")
    time.sleep(2.0)
    lab_only = _new_sessions(lab, WINDOW)
    daemons = {n.name: start_daemon(lab, n) for n in lab.nodes}
    try:
        with VipSampler(lab, ip=REPLICA_IP) as four, VipSampler(lab, ip=REPLICA6_IP) as six:
            _wait(lab, "replica VIP (both addresses) on node2", lambda: _holder(lab) == ["node2"]
                  and _holder(lab, REPLICA6_IP) == ["node2"])
            with RecoveryReader(lab, REPLICA6_IP) as reader:
                _wait(lab, "a client reads through the IPv6 replica address",
                      lambda: bool(reader.answers), 10)
            reader.assert_always_in_recovery()
            time.sleep(3.0)
            grown = _new_sessions(lab, WINDOW)
            print(f"\nnew sessions in {WINDOW:g} s: without daemons {lab_only}, "
                  f"with daemons and the replica VIP {grown}")
            assert all(grown[n] <= lab_only[n] + JITTER for n in grown), (grown, lab_only)

            daemons["node2"].kill()  # SIGKILL: nothing gives the address up on node2
            daemons["node2"].wait(10)
            lab.stop_postgres(node2)
            moved = _wait(lab, "replica VIP fenced off node2 and taken by node3",
                          lambda: _holder(lab) == ["node3"]
                          and _holder(lab, REPLICA6_IP) == ["node3"], 45)
            print(f"replica VIP moved off a node with a dead daemon in {moved:.2f} s")
            time.sleep(2.0)
            assert _holder(lab) == ["node3"] and _holder(lab, REPLICA6_IP) == ["node3"]
            # what users see: a status row per address with its holder, metrics per address
            status = vip(lab, lab.node("node1"), "status")
            rows = {line.split()[0]: line.split()[1:] for line in status.stdout.splitlines()
                    if line.strip()}
            assert rows[REPLICA] == ["replica", "node3"], status.stdout
            assert rows[REPLICA6] == ["replica", "node3"], status.stdout
            assert rows[VIP] == ["primary", "node1"], status.stdout
            held = metrics(lab, node3)
            assert f'repmgr_vip_replica_address_held{{address="{REPLICA6}"}} 1.0' in held
            assert "repmgr_vip_replica_held 1.0" in held
        four.assert_never_two()
        six.assert_never_two()
        assert lab.vip_holders() == ["node1"]
    finally:
        for proc in daemons.values():
            if proc.poll() is None:
                stop_daemon(proc)
