"""The one claim path and promote's verdict, on the shipped fakes (no root, no network)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from repmgr_vip.app import claim
from repmgr_vip.app.fencing import HOLDER_LAST
from repmgr_vip.config.schema import Config
from repmgr_vip.core.decide import Action
from repmgr_vip.core.errors import CommandFailed, VipError
from repmgr_vip.core.model import NodeRecord
from repmgr_vip.testing import SSH_LATENCY, FakeClock, FakeCluster, write_configs

NAMES = ("pg1", "pg2")
FOREIGN = "02:de:ad:be:ef:01"


def _world(tmp_path: Path) -> tuple[FakeCluster, dict[str, Config]]:
    world = FakeCluster(NAMES, FakeClock())
    world.promote("pg1", timeline=1)
    return world, write_configs(tmp_path, NAMES)


def test_claim_refuses_when_another_host_answers(tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    world.foreign.add(FOREIGN)
    address = world.address("pg1", configs["pg1"])
    result = claim.claim(address, proof=claim.arp_proof(address))
    assert result.outcome == claim.REFUSED and result.answered_by == (FOREIGN,)
    assert not world.hosts["pg1"].vip
    forced = claim.claim(address, proof=claim.arp_proof(address), force=True)
    assert forced.outcome == claim.ADDED and world.hosts["pg1"].vip
    again = claim.claim(address, proof=claim.arp_proof(address), force=True)
    assert again.outcome == claim.REFUSED and again.held_before  # two holders: never announce


def test_promotion_adds_the_vip_only_after_the_pending_proof(tmp_path: Path) -> None:
    """Every node confirmed before any probe ended: promote may start, but a host that
    answers for the VIP before the proof completes keeps it off this node."""
    world, configs = _world(tmp_path)
    config = configs["pg2"]
    fencing = world.fencing("pg2", config, world.records(but="pg2"))
    verdict = claim.promotion_verdict(fencing, "refuse")
    assert verdict.decision.action is Action.ACQUIRE
    assert verdict.report.released == ["pg1"] and verdict.proof is not None
    world.foreign.add(FOREIGN)  # appears while PostgreSQL is being promoted
    result = claim.claim(world.address("pg2", config), proof=verdict.proof)
    assert result.outcome == claim.REFUSED
    assert not world.hosts["pg2"].vip


def test_frozen_holder_with_failing_fence_command_refuses_the_promotion(tmp_path: Path) -> None:
    world, configs = _world(tmp_path)
    world.hosts["pg1"].vip = True
    world.freeze("pg1")
    world.fence_mode = "hang"
    fencing = world.fencing("pg2", configs["pg2"], world.records(but="pg2"))
    verdict = claim.promotion_verdict(fencing, "refuse")
    assert verdict.decision.action is Action.REFUSE
    assert verdict.report.failed == ["pg1"] and not verdict.report.fenced
    world.fence_mode = "ok"
    fencing = world.fencing("pg2", configs["pg2"], world.records(but="pg2"))
    verdict = claim.promotion_verdict(fencing, "refuse")
    assert verdict.decision.action is Action.ACQUIRE and verdict.report.fenced == ["pg1"]
    assert world.hosts["pg1"].off


def _three(tmp_path: Path) -> tuple[FakeCluster, dict[str, Config]]:
    """pg1 primary holding the VIP, pg2 (the promoting one) and pg3 standbys."""
    names = ("pg1", "pg2", "pg3")
    world = FakeCluster(names, FakeClock())
    world.promote("pg1", timeline=1)
    configs = write_configs(tmp_path, names)
    world.address("pg1", configs["pg1"]).add()
    world.events.clear()
    return world, configs


def _released_at(world: FakeCluster, host: str) -> float:
    return next(t for t, h, what in world.events if h == host and what.startswith("released"))


@pytest.mark.parametrize("bound", [HOLDER_LAST, 1.0])
def test_the_daemons_round_asks_the_old_primary_once_the_others_confirmed(
        tmp_path: Path, bound: float) -> None:
    """The old primary (the holder) lets go only once every other node confirmed, so the VIP
    is on no node for its release alone, not while the slowest link answers."""
    world, configs = _three(tmp_path)
    fencing = world.fencing("pg2", configs["pg2"], world.records(but="pg2"), holder_last=bound)
    asked = world.clock.now
    verdict = claim.promotion_verdict(fencing, "refuse")
    fencing.close()
    assert verdict.decision.action is Action.ACQUIRE
    assert verdict.report.released == ["pg3", "pg1"]
    assert world.round_started[("pg2", "pg3")] == asked
    assert world.round_started[("pg2", "pg1")] >= _released_at(world, "pg3")
    assert world.round_started[("pg2", "pg1")] < asked + max(bound, 0.1)
    assert not world.hosts["pg1"].vip and not world.violations


def test_a_standby_that_does_not_answer_delays_the_old_primary_only_to_the_bound(
        tmp_path: Path) -> None:
    world, configs = _three(tmp_path)
    world.freeze("pg3")
    fencing = world.fencing("pg2", configs["pg2"], world.records(but="pg2"), holder_last=0.2)
    asked = world.clock.now
    claim.promotion_verdict(fencing, "refuse")
    fencing.close()
    assert asked + 0.2 <= world.round_started[("pg2", "pg1")] < asked + 0.3
    assert _released_at(world, "pg1") < asked + 0.5
    assert not world.hosts["pg1"].vip and not world.violations


def test_with_the_holder_in_the_prior_proof_the_round_ends_on_its_release(
        tmp_path: Path) -> None:
    """The daemon's proof a moment ago heard only the old primary: it is asked first and
    alone, and its confirmation frees the VIP by itself (a standby holding it would have
    answered too), so no other link keeps the VIP on no node or competes with the add. The
    standby is asked once the VIP is up (ask_rest), and its confirmation still counts: only
    nodes that never answer go to the release retrier."""
    world, configs = _three(tmp_path)
    world.freeze("pg3")
    fencing = world.fencing("pg2", configs["pg2"], world.records(but="pg2"),
                            holder_last=HOLDER_LAST, prior=(world.hosts["pg1"].mac,))
    asked = world.clock.now
    verdict = claim.promotion_verdict(fencing, "refuse")
    assert verdict.decision.action is Action.ACQUIRE and verdict.proof is None
    assert world.round_started[("pg2", "pg1")] == asked
    assert ("pg2", "pg3") not in world.round_started
    assert world.clock.now <= asked + SSH_LATENCY + 0.01  # pg1's round trip, nothing more
    assert verdict.report.released == ["pg1"]
    fencing.ask_rest()
    assert world.round_started[("pg2", "pg3")] == world.clock.now
    assert fencing.settle().unconfirmed == ["pg3"]  # frozen: not yet
    world.resume("pg3")
    world.clock.sleep(0.2)
    assert fencing.settle().unconfirmed == []
    fencing.close()
    assert not world.hosts["pg1"].vip and not world.violations


def test_a_silent_prior_proof_frees_the_vip_before_any_other_node_is_asked(
        tmp_path: Path) -> None:
    """The old primary's host is cut off and nobody answered the proof a moment ago: the VIP
    is free at once; the old primary is asked (it may come back), the others only after the
    add, and none of them is waited for."""
    world, configs = _three(tmp_path)
    world.partition(["pg1"])
    fencing = world.fencing("pg2", configs["pg2"], world.records(but="pg2"),
                            holder_last=HOLDER_LAST, prior=())
    asked = world.clock.now
    verdict = claim.promotion_verdict(fencing, "refuse")
    assert verdict.decision.action is Action.ACQUIRE and verdict.proof is None
    assert world.clock.now < asked + 0.01
    assert ("pg2", "pg1") in world.round_started and ("pg2", "pg3") not in world.round_started
    fencing.ask_rest()
    world.clock.sleep(0.2)
    assert fencing.settle().unconfirmed == ["pg1"]  # cut off: the release retrier's
    fencing.close()
    assert not world.violations


def test_when_the_old_primarys_confirmation_does_not_free_the_vip_the_rest_are_asked(
        tmp_path: Path) -> None:
    """Holder first, but the prior proof also heard pg3 (it holds the VIP too): pg1's
    confirmation is not enough, pg3 is asked at once and its confirmation frees the VIP."""
    world, configs = _three(tmp_path)
    world.address("pg3", configs["pg3"]).add()
    fencing = world.fencing("pg2", configs["pg2"], world.records(but="pg2"),
                            holder_last=HOLDER_LAST,
                            prior=(world.hosts["pg1"].mac, world.hosts["pg3"].mac))
    asked = world.clock.now
    verdict = claim.promotion_verdict(fencing, "refuse")
    fencing.close()
    assert verdict.decision.action is Action.ACQUIRE and verdict.proof is None
    assert world.round_started[("pg2", "pg3")] == _released_at(world, "pg1")
    assert world.clock.now <= asked + 2 * SSH_LATENCY + 0.01  # two round trips, one after the other
    assert sorted(verdict.report.released) == ["pg1", "pg3"]
    assert not world.hosts["pg1"].vip and not world.hosts["pg3"].vip and not world.violations


def test_a_prior_proof_with_a_stray_mac_waits_for_every_confirmation(tmp_path: Path) -> None:
    """A MAC no node released answered a moment ago (and still does): pg1's confirmation
    does not free the VIP; the round waits for every node and refuses."""
    world, configs = _three(tmp_path)
    world.foreign.add(FOREIGN)
    world.freeze("pg3")
    fencing = world.fencing("pg2", configs["pg2"], world.records(but="pg2"),
                            holder_last=HOLDER_LAST, prior=(world.hosts["pg1"].mac, FOREIGN))
    asked = world.clock.now
    verdict = claim.promotion_verdict(fencing, "refuse")
    fencing.close()
    assert verdict.decision.action is Action.REFUSE
    assert world.clock.now >= asked + 1.0  # not on pg1's confirmation: pg3 timed out first
    assert verdict.report.released == ["pg1"] and "pg3" in verdict.report.unconfirmed


def test_without_warm_links_every_node_is_asked_at_once(tmp_path: Path) -> None:
    """ssh exec releases take hundreds of milliseconds each: a hook asks everyone at once."""
    world, configs = _three(tmp_path)
    fencing = world.fencing("pg2", configs["pg2"], world.records(but="pg2"))
    claim.promotion_verdict(fencing, "refuse")
    fencing.close()
    assert world.round_started[("pg2", "pg1")] == world.round_started[("pg2", "pg3")]


def _records(world: FakeCluster, *names: str) -> list[NodeRecord]:
    return [r for r in world.records() if r.node_name in names]


def test_arp_silence_ends_the_round_before_the_fresh_node_list_comes(tmp_path: Path) -> None:
    """Nobody answers for the VIP: who else is registered does not matter for the add. The
    nodes only the fresh list names are still asked (the hold marker) once it comes."""
    world, configs = _three(tmp_path)
    world.address("pg1", configs["pg1"]).remove()  # the old primary's host let it go
    fencing = world.fencing("pg2", configs["pg2"], _records(world, "pg1"))
    coming: Future[list[NodeRecord]] = Future()
    fencing.expect_soon(coming)
    verdict = claim.promotion_verdict(fencing, "refuse")
    fencing.close()
    assert verdict.decision.action is Action.ACQUIRE and not coming.done()
    assert ("pg2", "pg3") not in world.round_started
    coming.set_result(_records(world, "pg1", "pg3"))
    assert ("pg2", "pg3") in world.round_started


def test_a_late_node_list_and_the_add_never_ask_a_node_twice(tmp_path: Path) -> None:
    """Holder first, the round ended on silence before the fresh node list came: its
    callback asks the deferred standby from the list reader's thread while the promotion
    asks the rest after the add (ask_rest). Seen in the lab: both walked the deferred nodes
    at once, asked them twice, and the daemon's promotion died on "dictionary changed size
    during iteration" (the hook then redid the VIP step itself, 1.8 s later)."""
    world, configs = _three(tmp_path)
    fencing = world.fencing("pg2", configs["pg2"], world.records(but="pg2"),
                            holder_last=HOLDER_LAST, prior=(world.hosts["pg1"].mac,))
    inner = fencing.remote
    entered, gate = threading.Event(), threading.Event()
    asked: list[str] = []
    main = threading.current_thread()

    class Gated:
        def start_release(self, node: NodeRecord) -> Any:
            asked.append(node.node_name)
            if threading.current_thread() is not main:  # the list reader's thread: hold it
                entered.set()
                gate.wait(5)
            return inner.start_release(node)

    fencing.remote = Gated()
    coming: Future[list[NodeRecord]] = Future()
    fencing.expect_soon(coming)
    verdict = claim.promotion_verdict(fencing, "refuse")
    assert verdict.decision.action is Action.ACQUIRE and asked == []
    reader = threading.Thread(target=coming.set_result, args=(world.records(but="pg2"),))
    reader.start()
    assert entered.wait(5)
    opener = threading.Timer(0.3, gate.set)
    opener.start()
    fencing.ask_rest()  # the promotion, after the add
    reader.join(5)
    opener.join(5)
    assert asked == ["pg3"]
    world.clock.sleep(0.2)
    assert fencing.settle().unconfirmed == []
    fencing.close()
    assert not world.violations


def test_confirmations_count_only_against_the_fresh_node_list(tmp_path: Path) -> None:
    """The cached list lacks pg3; the fresh one names it and pg3 does not answer: the
    promotion waits for the ARP proof instead of starting on pg1's confirmation."""
    world, configs = _three(tmp_path)
    world.freeze("pg3")
    fencing = world.fencing("pg2", configs["pg2"], _records(world, "pg1"))
    coming: Future[list[NodeRecord]] = Future()
    fencing.expect_soon(coming)
    comes_at = world.clock.now + 0.1  # after pg1 confirmed (SSH_LATENCY)
    world.clock.hooks.append(lambda: coming.set_result(_records(world, "pg1", "pg3"))
                             if world.clock.now >= comes_at and not coming.done() else None)
    verdict = claim.promotion_verdict(fencing, "refuse")
    fencing.close()
    assert verdict.report.released == ["pg1"] and "pg3" in verdict.report.unconfirmed
    assert verdict.proof is None  # not started on confirmations with the proof still owed


def test_a_failed_node_list_read_refuses_the_promotion(tmp_path: Path) -> None:
    world, configs = _three(tmp_path)
    fencing = world.fencing("pg2", configs["pg2"], _records(world, "pg1", "pg3"))
    coming: Future[list[NodeRecord]] = Future()
    coming.set_exception(CommandFailed("cannot read repmgr.nodes"))
    fencing.expect_soon(coming)
    with pytest.raises(VipError):
        claim.promotion_verdict(fencing, "refuse")
    fencing.close()


# --- a hook without a daemon: its round's first complete proof is the prior ----------------


def _late(world: FakeCluster, configs: dict[str, Config]) -> Any:
    from repmgr_vip.app.fencing import HOLDER_FIRST_SSH

    world.complete_proofs = True  # the root helper's LAN proof through sudo
    return world.fencing("pg2", configs["pg2"], world.records(but="pg2"),
                         holder_last=HOLDER_FIRST_SSH, late_prior=True)


def test_a_hooks_first_proof_lets_the_old_primarys_release_free_the_vip(
        tmp_path: Path) -> None:
    """No daemon: the hook's first complete proof (taken while the old primary's ssh is
    still under way) heard only pg1; pg1 is asked first and alone, its confirmation frees the
    VIP without a proof after it, and pg3 is asked only after the add."""
    world, configs = _three(tmp_path)
    fencing = _late(world, configs)
    asked = world.clock.now
    verdict = claim.promotion_verdict(fencing, "refuse")
    assert verdict.decision.action is Action.ACQUIRE and verdict.proof is None
    assert ("pg2", "pg3") not in world.round_started
    assert world.clock.now <= asked + SSH_LATENCY + 0.01  # pg1's round trip, no proof after
    assert verdict.report.released == ["pg1"]
    fencing.ask_rest()
    world.clock.sleep(0.2)
    assert fencing.settle().unconfirmed == []
    fencing.close()
    assert not world.hosts["pg1"].vip and not world.violations


def test_a_hooks_first_proof_with_a_stray_mac_keeps_the_full_round(tmp_path: Path) -> None:
    """The first proof also heard a MAC no node releases: pg1's confirmation frees nothing,
    pg3 is asked at once, and the proof after the confirmations refuses."""
    world, configs = _three(tmp_path)
    world.foreign.add(FOREIGN)
    fencing = _late(world, configs)
    verdict = claim.promotion_verdict(fencing, "refuse")
    fencing.close()
    assert verdict.decision.action is Action.REFUSE
    assert sorted(verdict.report.released) == ["pg1", "pg3"]
    assert world.round_started[("pg2", "pg3")] == _released_at(world, "pg1")
    assert not world.hosts["pg2"].vip and not world.violations


def test_a_hook_whose_proofs_are_not_complete_asks_everyone_at_once(tmp_path: Path) -> None:
    """arping (an old sudoers file without the helper's line) hears the first answer only:
    no prior from it, so nobody is held back."""
    world, configs = _three(tmp_path)
    fencing = _late(world, configs)
    world.complete_proofs = False
    fencing.prober = world.prober(fencing.network)  # the helper failed: arping proves
    claim.promotion_verdict(fencing, "refuse")
    fencing.close()
    assert world.round_started[("pg2", "pg1")] == world.round_started[("pg2", "pg3")]
