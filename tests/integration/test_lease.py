"""vip.lease with real repmgrd and the daemon on every node: a frozen primary's VIP expires on
its own so the failover goes through without a fence_command; a stalled daemon keeps it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab import INTERFACE, Lab, Node, VipSampler
from tests.integration.vipconf import (
    config_path,
    has_vip,
    install_generated_sudoers,
    journal_entries,
    metrics,
    never_during,
    start_daemon,
    stop_daemon,
    vip_log,
    wait_until,
    wire_hooks,
    write_vip_config,
)

pytestmark = pytest.mark.lab

LEASE = 4
SLACK = 3.0  # last renewal up to 1 s before the freeze, kernel ~0.2 s late, polling
FAST_SSH = "[fencing]\nssh_connect_timeout = 2\nssh_command_timeout = 4\n"








def write_leased_config(lab: Lab, node: Node, lease: float, extra: str = "") -> Path:
    path = write_vip_config(lab, node, extra)
    text = path.read_text()
    anchor = f'interface = "{INTERFACE}"\n'
    path.write_text(text.replace(anchor, anchor + f"lease = {lease}\n", 1))
    return path


class LeasedCluster:
    """Leased configs, the daemon on every node first, then repmgrd started the repmgr way."""

    def __init__(self, lab: Lab, lease: float = LEASE, extra: str = "") -> None:
        self.lab = lab
        for node in lab.nodes:
            write_leased_config(lab, node, lease, extra)
        install_generated_sudoers(lab, lab.nodes[0])
        for node in lab.nodes:
            wire_hooks(lab, node)
        self.daemons = {n.name: start_daemon(lab, n) for n in lab.nodes}
        wait_until(lab, "every daemon has run a cycle", lambda: all(
            (n.dir / "repmgr-vip-daemon.json").exists() for n in lab.nodes), 30)
        for node in lab.nodes:
            result = lab.repmgr(node, "daemon", "start", check=False, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
        wait_until(lab, "VIP on node1", lambda: lab.vip_holders() == ["node1"], 15)
        # a freeze in the first moments of repmgrd once left a standby's repmgrd silent for
        # the whole test (no failover decision at all): freeze only once every standby's
        # monitoring loop has seen its upstream (repmgr's own upstream_last_seen)
        wait_until(lab, "every standby's repmgrd monitoring its upstream", lambda: all(
            _seen_upstream(lab, n) for n in lab.nodes[1:]), 30, interval=0.2)

    def stop(self) -> None:
        for proc in self.daemons.values():
            if proc.poll() is None:
                stop_daemon(proc)


def _seen_upstream(lab: Lab, node: Node) -> bool:
    """repmgrd on this standby checked its upstream within the last second."""
    try:
        seen = lab.psql(node, "SELECT repmgr.get_upstream_last_seen()", timeout=3)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return False
    return seen.lstrip("-").isdigit() and 0 <= int(seen) <= 1


def _daemon_pid(proc: subprocess.Popen[str], node: Node) -> int:
    """The daemon's own pid (ip netns exec and setpriv exec in place)."""
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"daemon" in cmdline and str(config_path(node)).encode() in cmdline, cmdline
    return proc.pid


def _primary(lab: Lab) -> Node | None:
    for node in lab.nodes[1:]:
        if lab.is_in_recovery(node) is False:
            return node
    return None


def _client_writes(lab: Lab) -> bool:
    result = lab.client_psql("CREATE TABLE IF NOT EXISTS lease_probe (at timestamptz); "
                             "INSERT INTO lease_probe VALUES (now())", check=False, timeout=5)
    return result.returncode == 0


@pytest.mark.parametrize(("lease", "fencing"), [
    (LEASE, FAST_SSH),
    # repmgrd needs ~11 s to give up on a frozen (not dead) primary; SSH gives up 2 s later,
    # long before this lease ends: the promotion waits the lease out instead of refusing
    (20, "[fencing]\nssh_connect_timeout = 1\nssh_command_timeout = 2\n"),
], ids=["lease-4", "lease-20-outlasts-ssh"])
def test_frozen_primary_loses_the_vip_and_the_failover_goes_through(
    lab_factory: Callable[..., Lab], lease: int, fencing: str,
) -> None:
    lab = lab_factory(nodes=3)
    cluster = LeasedCluster(lab, lease, fencing)
    node1 = lab.nodes[0]
    try:
        with VipSampler(lab) as sampler:
            frozen_at = time.monotonic()
            lab.freeze(node1)  # PostgreSQL, repmgrd, sshd and the daemon: a hung host
            try:
                gone = wait_until(lab, "VIP expired on the frozen node1",
                             lambda: not has_vip(lab, node1), lease + SLACK + 5)
                wait_until(lab, "a standby promoted", lambda: _primary(lab) is not None, 60)
                new = _primary(lab)
                assert new is not None
                wait_until(lab, f"VIP on {new.name}", lambda: lab.vip_holders() == [new.name], 30)
                moved = time.monotonic() - frozen_at
                wait_until(lab, "a client writes through the VIP", lambda: _client_writes(lab), 20)
                print(f"\nlease {lease} s: VIP gone from frozen node1 after {gone:.2f} s, "
                      f"on {new.name} after {moved:.2f} s, client write after "
                      f"{time.monotonic() - frozen_at:.2f} s")
            finally:
                lab.thaw(node1)
            never_during(lambda: has_vip(lab, node1), 8.0)
            assert lab.vip_holders() == [new.name]
        sampler.assert_never_two()
        assert gone <= lease + SLACK, f"VIP outlived the {lease} s lease: {gone:.2f} s"
        print("".join(line + "\n" for line in vip_log(new).splitlines()
                      if "promote" in line or "lease" in line))
        assert not journal_entries(new, source="promote", action="refuse")
    finally:
        cluster.stop()


def test_daemon_stalled_for_half_the_lease_keeps_the_vip(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    cluster = LeasedCluster(lab, LEASE)
    node1 = lab.nodes[0]
    pid = _daemon_pid(cluster.daemons["node1"], node1)
    try:
        with VipSampler(lab) as sampler:
            for pause in (0.0, 0.35, 0.7):  # stalls at different points of the 1 s cycle
                time.sleep(1.0 + pause)
                os.kill(pid, signal.SIGSTOP)
                time.sleep(LEASE / 2)
                os.kill(pid, signal.SIGCONT)
            time.sleep(LEASE + 1.0)  # and after the last stall, past one more lease
        holders = {h for _, h in sampler.samples}
        assert holders == {("node1",)}, sampler.transitions()
        # a late renewal (the stall guard) counts as a failure too
        gauges = {line.split()[0]: float(line.split()[1])
                 for line in metrics(lab, node1).splitlines()
                 if line.startswith("repmgr_vip_lease")}
        assert gauges["repmgr_vip_lease_renewal_failures_total"] == 0
        assert 0 < gauges["repmgr_vip_lease_remaining_seconds"] <= LEASE
    finally:
        cluster.stop()
