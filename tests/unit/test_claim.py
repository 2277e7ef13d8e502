"""The one claim path and promote's verdict, on the shipped fakes (no root, no network)."""

from __future__ import annotations

from pathlib import Path

from repmgr_vip.app import claim
from repmgr_vip.config.schema import Config
from repmgr_vip.core.decide import Action
from repmgr_vip.testing import FakeClock, FakeCluster, write_configs

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
