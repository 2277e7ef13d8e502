"""Safety under faults (issue 8): each scenario is a way today's tool broke its promise that
the VIP is never on two nodes, a healthy node is never fenced, and nothing an operator
plausibly does blocks a failover. Real repmgrd; a 50 ms sampler watches every node.

Assertions are on what users see: who holds the VIP, exit codes, files.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab import MOUNT, PG_BIN, UMOUNT, VIP, Lab, Node, VipSampler, run_cmd
from repmgr_vip.config import statepaths
from tests.integration.vipconf import (
    REPMGR_VIP,
    config_path,
    has_vip,
    hooked_cluster,
    journal_entries,
    start_daemon,
    vip,
    wait_until,
)

pytestmark = pytest.mark.lab

STATE_FILE = statepaths.DAEMON_STATE
PERIOD = 1.0  # [daemon] interval, the default






def _ip_vip(lab: Lab, node: Node | None, verb: str) -> None:
    """`ip address add|del VIP` by hand, as root, in a node (None: the lab's client)."""
    lab.run(node, ["ip", "-4", "address", verb, VIP, "dev", "eth0"], user="root", check=False)


def _never_two(sampler: VipSampler) -> None:
    """assert_never_two(), after printing the sample periods (they are part of the proof)."""
    print(f"sampler periods: {sampler.period_stats()}")
    sampler.assert_never_two()


def _start_daemons(lab: Lab) -> dict[str, subprocess.Popen[str]]:
    """The daemon on every node (as the systemd unit runs it), once each has cycled."""
    daemons = {n.name: start_daemon(lab, n) for n in lab.nodes}
    wait_until(lab, "every daemon has run a cycle",
          lambda: all((n.dir / STATE_FILE).exists() for n in lab.nodes), 30)
    return daemons


def _daemon_cluster(lab: Lab, extra: str = "") -> dict[str, subprocess.Popen[str]]:
    hooked_cluster(lab, extra)
    daemons = _start_daemons(lab)
    wait_until(lab, "the VIP on node1 only", lambda: lab.vip_holders() == ["node1"], 10)
    return daemons


def _postgres_owned(path: Path, mode: int = 0o755) -> Path:
    pw = pwd.getpwnam("postgres")
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    path.chmod(mode)
    return path


class StallWatch(threading.Thread):
    """Reads each node's daemon state file every 100 ms: the longest time its "time" did not
    advance is how long that daemon was stuck (a stuck daemon neither re-adds nor releases)."""

    def __init__(self, nodes: list[Node]) -> None:
        super().__init__(name="stall-watch", daemon=True)
        self.nodes = nodes
        self.stop_event = threading.Event()
        now = time.monotonic()
        self.last_value: dict[str, object] = {n.name: self._read(n) for n in nodes}
        self.last_change = {n.name: now for n in nodes}
        self.longest = {n.name: 0.0 for n in nodes}

    @staticmethod
    def _read(node: Node) -> object:
        try:
            return json.loads((node.dir / STATE_FILE).read_text())["time"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _tick(self) -> None:
        now = time.monotonic()
        for n in self.nodes:
            value = self._read(n)
            if value is not None and value != self.last_value[n.name]:
                self.last_value[n.name] = value
                self.last_change[n.name] = now
            self.longest[n.name] = max(self.longest[n.name], now - self.last_change[n.name])

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            self._tick()

    def finish(self) -> dict[str, float]:
        self.stop_event.set()
        self.join(5)
        self._tick()
        return {name: round(s, 2) for name, s in self.longest.items()}


# ---- a. two primaries on one timeline -------------------------------------------------


def test_two_primaries_on_one_timeline_at_most_one_holds(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    node1, node2, node3 = lab.nodes
    daemons = _daemon_cluster(lab)
    for node in lab.nodes:
        lab.stop_repmgrd(node)  # no failover by repmgrd: the DBA promotes by hand
    daemons["node1"].terminate()
    daemons["node1"].wait(10)
    lab.stop_postgres(node1)
    _ip_vip(lab, node1, "del")
    for node in (node2, node3):
        lab.psql(node, "SELECT pg_promote()", timeout=70)
    assert lab.timeline(node2) == lab.timeline(node3), "not one timeline"
    for node in (node2, node3):
        _ip_vip(lab, node, "add")
    assert sorted(lab.vip_holders()) == ["node2", "node3"]
    settled = wait_until(lab, "at most one holder", lambda: len(lab.vip_holders()) <= 1,
                    3 * PERIOD + 0.5)
    with VipSampler(lab) as sampler:
        time.sleep(5)
    _never_two(sampler)
    status = vip(lab, node2, "status", "--json")
    assert status.returncode == 1, status.stdout + status.stderr
    report = json.loads(status.stdout)
    primaries = {r["node_name"] for r in report["nodes"] if r["role"] == "primary"}
    assert primaries == {"node2", "node3"}, report
    assert any("node2" in c and "node3" in c for c in report["conflicts"]), report
    print(f"settled to at most one holder after {settled:.2f} s; holders now {sampler.last}")


# ---- b. a host outside the cluster answers for the VIP during a failover --------------


def test_foreign_host_on_the_vip_refuses_promotion_and_fences_nobody(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    node1, node2, node3 = lab.nodes
    box = _postgres_owned(lab.workdir / "fence")
    fence_log, rc_log = box / "fence.log", box / "promote-rc.log"
    fence = box / "fence.sh"
    fence.write_text(f'#!/bin/sh\necho "$*" >> {fence_log}\nexit 0\n')
    wrap = box / "promote.sh"  # records the promote hook's exit code, which repmgrd hides
    wrap.write_text(f'#!/bin/sh\n"$@"\nrc=$?\necho $rc >> {rc_log}\nexit $rc\n')
    for script in (fence, wrap):
        script.chmod(0o755)
    hooked_cluster(lab, f'[fencing]\nfence_command = "{fence} {{node_name}}"\n', start=False)
    for node in lab.nodes:
        lab.set_repmgr_conf(node, "promote_command",
                            f"{wrap} {REPMGR_VIP} -c {config_path(node)} promote")
        result = lab.repmgr(node, "daemon", "start", check=False, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    _start_daemons(lab)
    wait_until(lab, "the VIP on node1 only", lambda: lab.vip_holders() == ["node1"], 10)
    with VipSampler(lab) as sampler:
        _ip_vip(lab, None, "add")  # the stray host: the lab's client, with its own MAC
        stray_at = time.monotonic()
        lab.kill_postgres(node1)
        wait_until(lab, "the promote hook's exit code", lambda: rc_log.exists(), 60)
        time.sleep(max(2.0, 12.0 - (time.monotonic() - stray_at)))  # daemons' conflict checks
    _never_two(sampler)
    fenced = fence_log.read_text() if fence_log.exists() else ""
    codes = rc_log.read_text().split()
    recovery = {n.name: lab.is_in_recovery(n) for n in (node2, node3)}
    refusals = [e for n in (node2, node3)
                for e in journal_entries(n, source="promote", action="refuse", alarm="conflict")]
    named = [e for e in refusals
             if lab.client_mac.lower() in [m.lower() for m in e["inputs"]["answered_by"]]]
    print(f"fence_command runs {fenced.split()}, promote exit codes {codes}, "
          f"in recovery {recovery}, refusals naming the MAC {len(named)}")
    assert fenced == "", f"fence_command ran although every node confirmed: {fenced!r}"
    assert codes and set(codes) == {"3"}, codes
    assert recovery == {"node2": True, "node3": True}, recovery
    assert named, f"no refusal names the foreign MAC: {refusals}"


# ---- c. the primary's PostgreSQL frozen ----------------------------------------------


def test_frozen_postgres_vip_follows_and_old_node_never_readds(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    node1, node2, _ = lab.nodes
    _daemon_cluster(lab)
    watch = StallWatch(lab.nodes)  # node1's daemon above all; its peers query it too
    watch.start()
    with VipSampler(lab) as sampler:
        frozen = lab.freeze_postgres(node1)
        try:
            moved = wait_until(lab, "the VIP on node2 only",
                          lambda: lab.vip_holders() == ["node2"], 45)
            # the VIP goes up just before `repmgr standby promote`: the promotion follows
            wait_until(lab, "node2 promoted", lambda: lab.is_in_recovery(node2) is False, 30)
        finally:
            lab.thaw_postgres(frozen)
            stalls = watch.finish()
        end = time.monotonic() + 8
        while time.monotonic() < end:
            assert not has_vip(lab, node1), "node1 re-added the VIP after SIGCONT"
            time.sleep(0.05)
    _never_two(sampler)
    assert max(stalls.values()) <= 3.0, f"a daemon stopped cycling: {stalls}"
    print(f"VIP moved {moved:.2f} s after the freeze; longest daemon stall {stalls}")


# ---- d. fence-self with a full state directory ---------------------------------------


def _fill(directory: Path, limit: int = 1 << 20) -> None:
    """Fill a small tmpfs until ENOSPC; never more than `limit` bytes (refuses a real disk)."""
    assert os.path.ismount(directory), f"{directory} is not the test's tmpfs"
    written = 0
    with open(directory / "filler", "wb", buffering=0) as fh:
        while written < limit:
            try:
                written += fh.write(b"\0" * 4096)
            except OSError:
                return
    raise AssertionError(f"{directory} is not full after {limit} bytes")


def test_fence_self_with_a_full_state_dir_removes_the_vip(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    node1 = lab.nodes[0]
    hooked_cluster(lab)
    assert lab.vip_holders() == ["node1"]
    lab.repmgr(node1, "daemon", "pause")
    state = lab.workdir / "full-state"
    state.mkdir()
    # in this (the root) mount namespace: `ip netns exec` would mount in a private one
    run_cmd([MOUNT, "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(state)])
    try:
        _postgres_owned(state)
        _fill(state)
        # top-level keys go first in TOML; the log stays where the test can read it
        cfg = config_path(node1)
        text = cfg.read_text()
        cfg.write_text(f'state_dir = "{state}"\nlog_file = "{node1.dir / "repmgr-vip.log"}"\n'
                       + text)
        with VipSampler(lab) as sampler:
            result = vip(lab, node1, "fence-self")
        _never_two(sampler)
        assert not has_vip(lab, node1), (result.returncode, result.stderr)
    finally:
        run_cmd([UMOUNT, str(state)], check=False)
        if os.path.ismount(state):
            run_cmd([UMOUNT, "-l", str(state)], check=False)


# ---- e. hooks only: the primary's link down long enough for a failover ---------------


def test_hooks_only_link_down_then_back_loses_the_old_copy(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    node1, node2, _ = lab.nodes
    hooked_cluster(lab)  # no daemon anywhere
    with VipSampler(lab) as sampler:
        lab.link_down(node1)
        down_at = time.monotonic()
        wait_until(lab, "node2 promoted and holding", lambda: lab.vip_holders() == ["node2"]
              and lab.is_in_recovery(node2) is False, 40)
        # 15 s down, or longer if the failover took that long (it is what is tested)
        time.sleep(max(0.5, 15 - (time.monotonic() - down_at)))
        lab.link_up(node1)
        healed = time.monotonic()
        time.sleep(10)
    print(f"sampler periods: {sampler.period_stats()}")
    sampler.assert_sound()
    doubles = [t - healed for t, h in sampler.samples if len(h) > 1]
    print(f"two holders until +{max(doubles, default=0.0):.2f} s after the heal")
    assert not doubles or max(doubles) <= 2.0, (
        f"two holders until +{max(doubles):.2f} s after the heal: {sampler.transitions()}")
    assert sampler.last == ("node2",), sampler.transitions()


# ---- f. a DBA's exclusive lock on repmgr.nodes ---------------------------------------


def test_lock_on_repmgr_nodes_does_not_stall_the_daemons(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    node1 = lab.nodes[0]
    _daemon_cluster(lab)
    sql = ("BEGIN; LOCK TABLE repmgr.nodes IN ACCESS EXCLUSIVE MODE; "
           "SELECT pg_sleep(30); COMMIT")
    psql = [f"{PG_BIN}/psql", "-h", str(node1.socket_dir), "-U", "postgres", "-d", "repmgr",
            "-AtX", "-c", sql]
    session = lab.popen(node1, psql, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    holder = ("SELECT pid FROM pg_locks WHERE relation = 'repmgr.nodes'::regclass "
              "AND mode = 'AccessExclusiveLock' AND granted")
    backend: list[str] = []

    def locked() -> bool:
        backend[:] = lab.psql(node1, holder, timeout=5).split()
        return bool(backend)

    wait_until(lab, "the exclusive lock granted", locked, 15)
    watch = StallWatch(lab.nodes)
    watch.start()
    try:
        with VipSampler(lab) as sampler:
            time.sleep(1.5)
            _ip_vip(lab, node1, "del")
            deleted = time.monotonic()
            back = None
            with contextlib.suppress(TimeoutError):
                wait_until(lab, "VIP re-added on node1", lambda: has_vip(lab, node1),
                           2 * PERIOD + 1)
                back = time.monotonic() - deleted
            time.sleep(max(0.0, 8 - (time.monotonic() - deleted)))
        stalls = watch.finish()
    finally:
        watch.stop_event.set()
        with contextlib.suppress(Exception):
            lab.psql(node1, f"SELECT pg_terminate_backend({backend[0]})", dbname="postgres")
        session.kill()
    print(f"longest daemon stalls {stalls}; VIP back after {back} s")
    _never_two(sampler)
    assert max(stalls.values()) <= 3.0, f"daemons stopped cycling under the lock: {stalls}"
    assert back is not None and back <= 2 * PERIOD + 0.5, f"VIP back after {back} s"
