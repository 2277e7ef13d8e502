"""The order of things in promote, fencing, fence-self and the daemon cycle, without root.

The real hooks and the real Daemon run on the shipped fakes (repmgr_vip.testing) and a fake
clock: each test takes milliseconds. `world.events` is what happened on the segment, in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from repmgr_vip.app import hooks
from repmgr_vip.app.lease import wait_budget
from repmgr_vip.config.schema import Config
from repmgr_vip.core.decide import CONFLICT
from repmgr_vip.core.errors import ExitCode
from repmgr_vip.testing import (
    ARP_SILENCE,
    FakeClock,
    FakeCluster,
    FakeProber,
    quiet_log,
    write_configs,
)

NAMES = ("pg1", "pg2", "pg3")
FOREIGN = "02:de:ad:be:ef:01"


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_log():
        yield


def _world(tmp_path: Path, lease: float = 0) -> tuple[FakeCluster, dict[str, Config]]:
    """pg1 primary on timeline 1 holding the VIP; pg2 and pg3 standbys."""
    world = FakeCluster(NAMES, FakeClock())
    configs = write_configs(tmp_path, NAMES, lease=lease)
    world.promote("pg1", timeline=1)
    world.address("pg1", configs["pg1"]).add()
    world.events.clear()
    return world, configs


def _promote(world: FakeCluster, configs: dict[str, Config], name: str = "pg2") -> int:
    return hooks.promote(configs[name], own=world.hook_ports(name, configs[name]))


def _at(world: FakeCluster, host: str, what: str) -> int:
    """Index of the first event `what` (a prefix) on `host`."""
    return next(i for i, (_, h, w) in enumerate(world.events) if h == host and w.startswith(what))


# --- promote: remove before add, proof before claim, fence only the unconfirmed ------------


def test_promote_removes_the_vip_everywhere_before_adding_it(tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    assert _promote(world, configs) == ExitCode.OK
    assert world.hosts["pg2"].role == "primary" and world.hosts["pg2"].vip
    assert not world.hosts["pg1"].vip
    assert _at(world, "pg1", "released for pg2") < _at(world, "pg2", "promoted")
    assert _at(world, "pg1", "released for pg2") < _at(world, "pg2", "add")


def test_promote_adds_the_vip_only_after_an_arp_proof(tmp_path: Path) -> None:
    """Every node confirms over SSH long before ARP silence can prove anything: the promotion
    starts at once, but the VIP waits for the proof (README, fencing model step 2)."""
    world, configs = _world(tmp_path)
    started = world.clock.now
    assert _promote(world, configs) == ExitCode.OK
    added_at = world.events[_at(world, "pg2", "add")][0]
    assert added_at >= started + ARP_SILENCE


def test_a_foreign_holder_appearing_during_the_promotion_keeps_the_vip_off(
        tmp_path: Path) -> None:
    """The proof still owed when every node confirmed is judged after the confirmations:
    a host outside the cluster that answers then keeps the VIP off (README rule 2)."""
    world, configs = _world(tmp_path)
    world.clock.hooks.append(lambda: world.foreign.add(FOREIGN)
                             if world.hosts["pg1"].confirmed_to else None)
    assert _promote(world, configs) == ExitCode.OK  # repmgr's status: the promotion happened
    assert world.hosts["pg2"].role == "primary"
    assert not any(h.vip for h in world.hosts.values())
    assert not world.violations
    alarms = [e for e in world.hosts["pg2"].journal if e.get("alarm") == CONFLICT]
    assert alarms and alarms[-1]["answered_by"] == [FOREIGN]


def test_every_node_confirmed_and_the_vip_answers_refuses_without_fencing(
        tmp_path: Path) -> None:
    """README rule 2: a node that confirmed is never fenced; a stray host is named instead."""
    world, configs = _world(tmp_path)
    world.foreign.add(FOREIGN)
    assert _promote(world, configs) == ExitCode.REFUSED
    assert world.hosts["pg2"].role == "standby"  # a promotion cannot be undone: not started
    assert world.fenced == [] and not world.violations
    refusal = world.hosts["pg2"].journal[-1]
    assert refusal["action"] == "refuse" and FOREIGN in refusal["answered_by"]


def test_only_the_node_that_did_not_confirm_is_fenced(tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    world.freeze("pg1")  # its kernel answers ARP for the VIP; SSH says nothing
    assert _promote(world, configs) == ExitCode.OK
    assert world.fenced == ["pg1"]  # pg3 confirmed its release: never fenced
    assert not world.hosts["pg3"].off and not world.violations
    assert _at(world, "pg1", "fenced") < _at(world, "pg2", "add")
    assert world.hosts["pg2"].vip


@pytest.mark.parametrize("fence_mode", ["fail", "hang"])
def test_a_failing_or_hanging_fence_command_refuses_the_promotion(
        tmp_path: Path, fence_mode: str) -> None:
    world, configs = _world(tmp_path)
    world.freeze("pg1")
    world.fence_mode = fence_mode
    started = world.clock.now
    assert _promote(world, configs) == ExitCode.REFUSED
    assert world.hosts["pg2"].role == "standby" and not world.hosts["pg2"].vip
    config = configs["pg2"].fencing
    probe_window = 11.0  # ceil(probe_timeout) x probe_count + 10 (fencing._proof)
    assert world.clock.now - started <= (config.ssh_command_timeout + world.fence_timeout
                                         + probe_window)


def test_with_a_lease_promote_waits_out_a_frozen_holder(tmp_path: Path) -> None:
    """vip.lease: the frozen holder's kernel drops the VIP; promote waits for that (at most
    the lease + 2 s from the start of fencing) instead of refusing."""
    world, configs = _world(tmp_path, lease=3)
    world.freeze("pg1")
    world.fence_mode = "fail"
    started = world.clock.now
    assert _promote(world, configs) == ExitCode.OK
    assert _at(world, "pg1", "lease expired") < _at(world, "pg2", "add")
    added_at = world.events[_at(world, "pg2", "add")][0]
    assert added_at - started <= wait_budget(configs["pg2"]) + ARP_SILENCE + 1.0
    assert world.hosts["pg2"].vip and not world.hosts["pg1"].vip


def _promote_with_prior_proof(world: FakeCluster, configs: dict[str, Config],
                              answered: tuple[str, ...], age: float) -> int:
    """promote as the daemon runs it: with the ARP proof its cycle took `age` s before."""
    hands = world.hook_ports("pg2", configs["pg2"])
    taken = world.clock.now - age
    hands.fencing["prior_proof"] = lambda: (taken, answered)
    return hooks.promote(configs["pg2"], own=hands)


def test_a_proof_taken_before_the_failover_moves_the_vip_on_the_release(
        tmp_path: Path) -> None:
    """The old holder (PostgreSQL dead, its daemon keeping the VIP) answered the standby
    daemon's proof a moment ago and confirms its release with that MAC: the VIP goes up at
    once, before `repmgr standby promote`, with no second probe (no dark window)."""
    world, configs = _world(tmp_path)
    world.hosts["pg1"].running = False
    started = world.clock.now
    assert _promote_with_prior_proof(world, configs, (world.hosts["pg1"].mac,), 0.5) == 0
    released = world.events[_at(world, "pg1", "released for pg2")][0]
    added = world.events[_at(world, "pg2", "add")][0]
    assert _at(world, "pg1", "released for pg2") < _at(world, "pg2", "add")
    assert _at(world, "pg2", "add") < _at(world, "pg2", "promoted")
    assert added - released < 0.1 and added < started + ARP_SILENCE
    assert world.hosts["pg2"].vip and not world.hosts["pg1"].vip and not world.violations


@pytest.mark.parametrize("case", ["stale", "foreign"])
def test_a_stale_or_unaccounted_prior_proof_is_not_enough(tmp_path: Path, case: str) -> None:
    """Older than 2.5 periods, or naming a MAC that no confirming node released: the VIP
    waits for this round's own proof, as without a daemon."""
    world, configs = _world(tmp_path)
    answered = (world.hosts["pg1"].mac, *((FOREIGN,) if case == "foreign" else ()))
    started = world.clock.now
    age = 3.0 if case == "stale" else 0.5
    assert _promote_with_prior_proof(world, configs, answered, age) == 0
    added_at = world.events[_at(world, "pg2", "add")][0]
    assert added_at >= started + ARP_SILENCE


def test_a_failed_promotion_takes_back_the_vip_it_added_first(tmp_path: Path) -> None:
    """The VIP went up before `repmgr standby promote`, which then failed: PostgreSQL is
    still in recovery, and a standby does not keep the VIP."""
    world, configs = _world(tmp_path)
    world.clock.hooks.append(lambda: setattr(world.hosts["pg2"], "running", False)
                             if world.hosts["pg2"].vip else None)
    assert _promote_with_prior_proof(world, configs, (world.hosts["pg1"].mac,), 0.5) == 1
    assert _at(world, "pg2", "add") < _at(world, "pg2", "remove")
    assert not any(h.vip for h in world.hosts.values())
    assert world.hosts["pg2"].journal[-1]["action"] == "promote-failed"


def test_promote_of_a_node_whose_postgresql_died_takes_no_vip(tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    world.clock.hooks.append(lambda: setattr(world.hosts["pg2"], "running", False)
                             if world.hosts["pg1"].confirmed_to else None)
    assert _promote(world, configs) == 1  # repmgr's own status
    assert not any(h.vip for h in world.hosts.values())


# --- the release retrier (README rule 3) -----------------------------------------------


def test_a_returning_old_primary_loses_the_vip_without_any_daemon(tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    world.partition(["pg1"])
    assert _promote(world, configs) == ExitCode.OK
    assert world.hosts["pg1"].vip and world.hosts["pg2"].vip  # pg1 is cut off, unseen
    world.heal()
    healed = world.clock.now
    world.clock.sleep(2.0)
    assert not world.hosts["pg1"].vip and world.hosts["pg2"].vip
    released = world.events[_at(world, "pg1", "released for pg2's retrier")][0]
    assert released - healed <= 2.0


def test_the_retrier_leaves_a_node_primary_on_a_newer_timeline_alone(tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    world.partition(["pg1"])
    assert _promote(world, configs) == ExitCode.OK
    world.promote("pg1", timeline=world.max_timeline() + 1)  # pg1 became newer meanwhile
    world.heal()
    world.clock.sleep(3.0)
    assert world.hosts["pg1"].vip


# --- fence-self (README rule 5) -----------------------------------------------------------


@pytest.mark.parametrize("disk_full", [False, True])
def test_fence_self_removes_the_vip_first_even_on_a_full_disk(
        tmp_path: Path, disk_full: bool) -> None:
    world, configs = _world(tmp_path)
    world.hosts["pg1"].disk_full = disk_full
    hooks.fence_self(configs["pg1"], own=world.hook_ports("pg1", configs["pg1"]))
    assert not world.hosts["pg1"].vip
    assert (world.hosts["pg1"].marker_at is None) == disk_full


def test_the_daemon_keeps_the_vip_off_after_fence_self_for_the_hold(tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    daemon = world.daemon("pg1", configs["pg1"])
    hooks.fence_self(configs["pg1"], own=world.hook_ports("pg1", configs["pg1"]))
    fenced_at = world.clock.now
    while world.clock.now - fenced_at < 4.5:
        daemon.cycle()
        assert not world.hosts["pg1"].vip
        world.clock.sleep(1.0)
    world.clock.sleep(1.0)
    daemon.cycle()
    assert world.hosts["pg1"].vip  # majority reachable and the hold is over: taken back


# --- the daemon cycle -----------------------------------------------------------------


def test_a_standby_daemon_releases_in_one_cycle(tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    world.address("pg2", configs["pg2"]).add()
    world.daemon("pg2", configs["pg2"]).cycle()
    assert not world.hosts["pg2"].vip


def test_the_daemon_probes_before_adding_and_refuses_over_a_foreign_mac(
        tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    world.address("pg1", configs["pg1"]).remove()
    world.foreign.add(FOREIGN)
    daemon = world.daemon("pg1", configs["pg1"])
    daemon.cycle()
    assert not world.hosts["pg1"].vip and not world.violations
    assert world.hosts["pg1"].journal[-1]["alarm"] == CONFLICT
    world.foreign.clear()
    world.clock.sleep(1.0)
    daemon.cycle()
    assert world.hosts["pg1"].vip


def test_the_daemon_acts_only_when_the_hook_has_released_the_lock(tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    world.address("pg2", configs["pg2"]).add()
    daemon = world.daemon("pg2", configs["pg2"])
    with world.hook_ports("pg2", configs["pg2"]).lock(1.0):
        daemon.cycle()
        assert world.hosts["pg2"].vip  # a hook holds the node's lock: no action now
    world.clock.sleep(1.0)
    daemon.cycle()
    assert not world.hosts["pg2"].vip


def test_the_daemon_renews_its_lease_and_a_frozen_node_loses_the_vip(tmp_path: Path) -> None:
    world, configs = _world(tmp_path, lease=3)
    daemon = world.daemon("pg1", configs["pg1"])
    world.clock.hooks.append(lambda: daemon.cycle() if not world.hosts["pg1"].frozen else None)
    world.clock.sleep(10.0)  # more than three leases, renewed every cycle
    assert world.hosts["pg1"].vip and not world.violations
    world.freeze("pg1")
    frozen_at = world.clock.now
    world.clock.sleep(4.0)
    assert not world.hosts["pg1"].vip
    assert world.events[_at(world, "pg1", "lease expired")][0] - frozen_at <= 3.0


def test_a_stray_host_in_the_prior_proof_refuses_the_promotion(tmp_path: Path) -> None:
    """README rule 2: every node confirmed over its link before any probe of the round ended,
    but the daemon's proof a moment ago saw a MAC none of them released: the promotion waits
    for a probe after the confirmations, and is refused while the stray host answers."""
    world, configs = _world(tmp_path)
    world.foreign.add(FOREIGN)

    class SlowProber(FakeProber):  # the round's own probes end after the link's confirmations
        def latest(self) -> tuple[str, ...] | None:
            return super().latest() if self.clock.now >= self.started + 0.5 else None

    hands = world.hook_ports("pg2", configs["pg2"])
    taken = world.clock.now - 0.2
    hands.fencing["prior_proof"] = lambda: (taken, (world.hosts["pg1"].mac, FOREIGN))
    hands.fencing["prober"] = lambda address: SlowProber(address, world.clock)
    assert hooks.promote(configs["pg2"], own=hands) == ExitCode.REFUSED
    assert world.hosts["pg2"].role == "standby" and not world.hosts["pg2"].vip
    assert world.fenced == [] and not world.violations


def test_silence_in_the_prior_proof_proves_the_vip_free_at_once(tmp_path: Path) -> None:
    """The old primary's host is cut off (its VIP answers nobody): the daemon's proof a moment
    ago heard no answer, which proves the VIP free as a probe of the round would, without
    waiting for one (the cut-off node is left to the release retrier, as always)."""
    world, configs = _world(tmp_path)
    world.partition(["pg1"])
    started = world.clock.now
    assert _promote_with_prior_proof(world, configs, (), 0.2) == ExitCode.OK
    added_at = world.events[_at(world, "pg2", "add")][0]
    assert added_at < started + ARP_SILENCE  # a probe of the round is silent only after that
    assert world.hosts["pg2"].vip and not world.violations


# --- without a daemon, with complete proofs (the root helper): the old primary first -------


@pytest.mark.parametrize("pg3_frozen", [False, True])
def test_a_hook_asks_the_standbys_after_the_add_and_retries_only_the_silent(
        tmp_path: Path, pg3_frozen: bool) -> None:
    """The hook's first proof heard pg1 alone: pg1 is asked first, its release frees the VIP,
    pg3 is asked once pg2's PostgreSQL left recovery (its fresh ssh session does not compete
    with the promotion for the CPU). Its confirmation, over fresh ssh, comes after the add: it is
    waited for (SETTLE_WAIT) before the release retrier is started, so only a node that stays
    silent goes to it, not every standby a hook asked a moment ago."""
    world, configs = _world(tmp_path)
    world.complete_proofs = True
    world.ssh_latency = 0.8  # fresh ssh on a small host: longer than the promotion (0.5 s)
    if pg3_frozen:
        world.freeze("pg3")
    assert _promote(world, configs) == ExitCode.OK
    assert world.hosts["pg2"].vip and not world.hosts["pg1"].vip and not world.violations
    assert _at(world, "pg1", "released for pg2") < _at(world, "pg2", "add")
    assert world.round_started[("pg2", "pg3")] > world.round_started[("pg2", "pg1")]
    assert world.round_started[("pg2", "pg3")] >= world.events[_at(world, "pg2", "promoted")][0]
    if pg3_frozen:
        assert [r.pending for r in world.retriers] == [{"pg3"}]
    else:
        assert _at(world, "pg3", "released for pg2") > _at(world, "pg2", "add")
        assert not world.retriers
