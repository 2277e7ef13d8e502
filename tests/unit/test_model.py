"""A stateful model of a three-node cluster that runs the REAL daemon and promote fencing.

Every node runs the real `Daemon.cycle()`; a promotion runs the real `Fencing` and
`claim.promotion_verdict` (what `hooks.promote` runs) and then `claim.claim`, all through the
fakes of `repmgr_vip.testing`. Hypothesis draws the faults; the daemons keep cycling on the
fake clock while a promotion waits for its proof, so a hook and the daemons act in one step.

The invariants are the README's "Safety rules", checked after every step. "After K cycles"
means the situation has lasted K daemon periods of fake time without being resolved.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Iterator
from itertools import combinations
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from repmgr_vip.adapters.log import LOG
from repmgr_vip.app import claim, daemon
from repmgr_vip.core.decide import (
    SPLIT_BRAIN,
    Action,
    Decision,
    Memory,
    Policy,
    Snapshot,
    decide_cycle,
)
from repmgr_vip.testing import FakeClock, FakeCluster, FakeFiles, write_configs

NAMES = ("pg1", "pg2", "pg3")
FOREIGN = ("02:de:ad:be:ef:01", "02:de:ad:be:ef:02")
INTERVAL = 1.0
K = 3  # cycles: every rule settles within one or two periods (grace: 2 s here)
LIMIT = K * INTERVAL
_CONFIG_DIR = tempfile.TemporaryDirectory(prefix="rv-model-")  # removed at exit
CONFIGS = write_configs(Path(_CONFIG_DIR.name), NAMES)
STEPS = 20
PROMOTION_TIME = 0.5  # `repmgr standby promote` until PostgreSQL leaves recovery
EXAMPLES = 300  # x STEPS: up to 6,000 steps per CI run, about 5 s

names = st.sampled_from(NAMES)


class ClusterModel(RuleBasedStateMachine):
    """pg1 starts as primary on timeline 1 with the VIP; pg2 and pg3 are standbys."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.world = FakeCluster(NAMES, self.clock)
        self.world.promote("pg1", timeline=1)
        self.world.hosts["pg1"].vip = True
        self.daemons = {n: self.world.daemon(n, CONFIGS[n]) for n in NAMES}
        self.due = dict.fromkeys(NAMES, self.clock.now)
        self.busy: set[str] = set()
        self.since: dict[str, float] = {}
        self.heals_at: float | None = None
        self.clock.hooks.append(self.run_due)

    def run_due(self) -> None:
        """Each node whose user space runs does one daemon cycle per period."""
        if self.heals_at is not None and self.clock.now >= self.heals_at:
            self.heals_at = None
            self.world.heal()
        for name in NAMES:
            if (self.world.hosts[name].user_space and name not in self.busy
                    and self.due[name] <= self.clock.now):
                self.due[name] = self.clock.now + INTERVAL
                self.busy.add(name)
                try:
                    self.daemons[name].cycle()
                finally:
                    self.busy.discard(name)

    # --- time -----------------------------------------------------------------------

    @rule(periods=st.integers(1, 2))
    def time_passes(self, periods: int) -> None:
        self.clock.sleep(periods * INTERVAL)

    @rule()
    def settle(self) -> None:
        """No fault for K + 1 periods: whatever the rules say must happen "within K cycles"
        has happened by the checks that follow."""
        self.clock.sleep((K + 1) * INTERVAL)

    # --- faults: few rules with many kinds, so that each rule is drawn often -------------

    @rule(kind=st.sampled_from(["heal", "partition", "cut both ways", "cut one way"]),
          a=names, b=names, lasting=st.sampled_from([2.0, 5.0, None]))
    def network(self, kind: str, a: str, b: str, lasting: float | None = None) -> None:
        """heal; isolate `a` (a partition); cut the link a-b (a partial partition), or only
        the direction a -> b (an asymmetric one). A blip heals by itself after `lasting`
        seconds (with every other cut); None: until a heal."""
        if kind == "heal":
            self.world.heal()
            return
        if kind == "partition":
            self.world.partition([a])
        elif a != b:
            self.world.cut(a, b, both=kind == "cut both ways")
        if lasting is not None:
            self.heals_at = self.clock.now + lasting

    @rule(event=st.sampled_from(["freeze", "resume", "postgres crash", "postgres start",
                                 "power on", "rejoin", "disk full", "disk space"]), name=names)
    def host(self, event: str, name: str) -> None:
        host = self.world.hosts[name]
        if event == "freeze":
            self.world.freeze(name)
        elif event == "resume":
            self.world.resume(name)
        elif event.startswith("postgres") and not host.off:
            host.running = event == "postgres start"  # in the role it had
        elif event == "power on" and host.off:
            # a fenced host boots: PostgreSQL in its old role, no VIP, a fresh daemon
            host.off, host.frozen, host.running, host.vip = False, False, True, False
            self.daemons[name] = self.world.daemon(name, CONFIGS[name])
            self.due[name] = self.clock.now
        elif event == "rejoin" and host.user_space and host.running and host.role == "primary":
            # a person rejoins it as a standby (`repmgr node rejoin`; the event hook releases)
            host.role, host.node_type, host.vip = "standby", "standby", False
            host.timeline = self.world.max_timeline()
        elif event.startswith("disk"):
            host.disk_full = event == "disk full"

    @rule(mac=st.sampled_from(FOREIGN), present=st.booleans(),
          fence=st.sampled_from(["ok", "fail", "hang"]))
    def outside(self, mac: str, present: bool, fence: str) -> None:
        """A device outside the cluster answers for the VIP (or stops); fence_command starts
        to succeed, fail or hang."""
        (self.world.foreign.add if present else self.world.foreign.discard)(mac)
        self.world.fence_mode = fence

    # --- repmgr ---------------------------------------------------------------------------

    @rule(pick=st.integers(0, len(NAMES) - 1), same_timeline=st.booleans())
    def promote(self, pick: int, same_timeline: bool) -> None:
        """repmgr runs promote_command on a running standby; same_timeline: a double promotion
        (two standbys promoted from one timeline end up primary on the same new one)."""
        standbys = [h.name for h in self.world.hosts.values()
                    if h.role == "standby" and h.user_space and h.running]
        if not standbys:
            return
        name = standbys[pick % len(standbys)]
        config = CONFIGS[name]
        files = self.daemons[name].files
        assert isinstance(files, FakeFiles)
        with files.hold("promote"):  # the hook holds the node's lock, as hooks.promote does
            fencing = self.world.fencing(name, config, self.world.records(but=name))
            try:
                verdict = claim.promotion_verdict(fencing, config.fencing.when_vip_not_free)
            finally:
                fencing.close()
            if verdict.decision.action is Action.REFUSE:
                return
            self.clock.sleep(PROMOTION_TIME)  # the daemons keep cycling meanwhile
            primaries = [h.timeline for h in self.world.hosts.values() if h.role == "primary"]
            timeline = self.world.promote(
                name, max(primaries) if same_timeline and primaries else None)
            for other in self.world.hosts.values():  # repmgrd makes the standbys follow
                if other.role == "standby" and self.world.talks(name, other.name):
                    other.timeline = timeline
            if verdict.decision.action is Action.ACQUIRE:
                claim.claim(self.world.address(name, config), proof=verdict.proof)

    def check(self, _step: None = None) -> None:
        """Every invariant, as Hypothesis runs them after each step (for replayed seeds)."""
        self.no_two_reachable_holders()
        self.only_the_newest_primary_holds()
        self.confirmed_nodes_are_never_fenced()
        self.lone_primary_gets_the_vip()

    # --- the rules ------------------------------------------------------------------------

    def _lasting(self, key: str, true_now: bool) -> float:
        """For how long (fake seconds) `key` has been true at every check until now."""
        if not true_now:
            self.since.pop(key, None)
            return 0.0
        return self.clock.now - self.since.setdefault(key, self.clock.now)

    def _serves(self, name: str) -> bool:
        """PostgreSQL on `name` answers queries (from a node it talks with)."""
        host = self.world.hosts[name]
        return host.user_space and host.running

    @invariant()
    def no_two_reachable_holders(self) -> None:
        """Rule 1: after at most K cycles, no two nodes that reach each other (and run their
        daemon) both hold the VIP."""
        for a, b in combinations(NAMES, 2):
            ha, hb = self.world.hosts[a], self.world.hosts[b]
            both = (ha.vip and hb.vip and ha.user_space and hb.user_space
                    and self.world.talks(a, b))
            assert self._lasting(f"two:{a}:{b}", both) <= LIMIT, (
                f"{a} and {b} reach each other and both hold the VIP for more than {K} cycles")

    @invariant()
    def only_the_newest_primary_holds(self) -> None:
        """Rule 1: no standby, stopped, or stale-timeline node (one that a primary on a newer
        timeline answers) holds the VIP after K cycles."""
        for name in NAMES:
            host = self.world.hosts[name]
            stale = any(p.role == "primary" and p.timeline > host.timeline
                        and self._serves(p.name) and self.world.talks(name, p.name)
                        for p in self.world.hosts.values())
            wrong = host.vip and host.user_space and (
                host.role == "standby" or not host.running or stale)
            assert self._lasting(f"wrong:{name}", wrong) <= LIMIT, (
                f"{name} ({host.role}, tl {host.timeline}, running={host.running}) holds the "
                f"VIP for more than {K} cycles")

    @invariant()
    def confirmed_nodes_are_never_fenced(self) -> None:
        """Rule 2: a node that confirmed its release in a fencing round is not fenced in that
        round, and nobody adds the VIP while a host outside the cluster answers for it."""
        assert not self.world.violations, self.world.violations

    @invariant()
    def lone_primary_gets_the_vip(self) -> None:
        """Liveness: a lone legitimate primary (no other primary on its timeline or a newer
        one, nobody else answering for the VIP) that reaches a majority holds it within K
        cycles."""
        for name in NAMES:
            host = self.world.hosts[name]
            rivals = [h for h in self.world.hosts.values() if h.name != name and (
                h.vip or (h.role == "primary" and h.timeline >= host.timeline))]
            reached = sum(1 for n in NAMES if self._serves(n) and self.world.talks(name, n))
            lone = (host.role == "primary" and self._serves(name) and not rivals
                    and not self.world.foreign and 2 * reached > len(NAMES))
            waiting = lone and not host.vip
            assert self._lasting(f"live:{name}", waiting) <= LIMIT, (
                f"{name} is the lone primary (tl {host.timeline}), reaches a majority and has "
                f"not taken the VIP within {K} cycles")


TestClusterModel = ClusterModel.TestCase
TestClusterModel.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _quiet_log() -> Iterator[None]:
    """Thousands of cycles: log only what would fail a test."""
    level = LOG.level
    LOG.setLevel(logging.CRITICAL)
    yield
    LOG.setLevel(level)


def d64c739_decide_cycle(snapshot: Snapshot, memory: Memory,
                         policy: Policy) -> tuple[Decision, Memory]:
    """decide_cycle as of d64c739: two primaries on one timeline keep what they have.

    The differences from today's function in a cluster without a witness (d64c739 also took a
    witness's own primary for a data primary): where today both release, it kept; and it
    re-added a VIP that a promoting peer had just asked it to release.
    """
    # d64c739 had neither the split-brain rule nor the hold-off after a peer's release request
    snapshot = dataclasses.replace(snapshot, release_request_age=None)
    decision, memory = decide_cycle(snapshot, memory, policy)
    if decision.alarm == SPLIT_BRAIN:
        state = "holding" if snapshot.holds_vip else "not acquiring"
        return Decision(Action.KEEP, f"{state}: another primary on this timeline"), memory
    return decision, memory


def _with_decide(monkeypatch: pytest.MonkeyPatch,
                 fn: Callable[[Snapshot, Memory, Policy], tuple[Decision, Memory]]) -> None:
    monkeypatch.setattr(daemon, "decide_cycle", fn)


def replay_partial_partition(model: ClusterModel) -> None:
    """A partial partition cuts pg1 from pg2, repmgr promotes pg2 onto pg1's timeline, pg2
    takes the VIP (pg1 does not answer its ARP), the link heals."""
    model.check(model.network("cut both ways", "pg1", "pg2"))
    model.check(model.promote(0, same_timeline=True))  # pg2, the first running standby
    model.check(model.time_passes(2))
    model.check(model.network("heal", "pg1", "pg1"))
    model.check(model.settle())


def replay_reacquired_during_promotion(model: ClusterModel) -> None:
    """What the model shrank d64c739's decide.py to: pg3 is promoted onto pg1's timeline
    while pg2 is cut off; pg1 confirms its release, its daemon takes the VIP back while
    PostgreSQL on pg3 is being promoted (pg1 is still the only primary it sees), pg3 adds it."""
    model.check(model.network("partition", "pg2", "pg1", 2.0))
    model.check(model.promote(1, same_timeline=True))
    model.check(model.settle())


SEEDS = [replay_partial_partition, replay_reacquired_during_promotion]


@pytest.mark.parametrize("replay", SEEDS)
def test_same_timeline_split_brain_is_resolved(replay: Callable[[ClusterModel], None]) -> None:
    model = ClusterModel()
    replay(model)
    assert not any(h.vip for h in model.world.hosts.values())


def test_model_catches_d64c739s_same_timeline_split_brain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The regression fails with d64c739's rule, and the random model finds it by itself."""
    _with_decide(monkeypatch, d64c739_decide_cycle)
    for replay in SEEDS:
        with pytest.raises(AssertionError, match="both hold the VIP"):
            replay(ClusterModel())
    with pytest.raises(AssertionError, match="both hold the VIP"):
        run_state_machine_as_test(ClusterModel, settings=settings(
            max_examples=2000, stateful_step_count=STEPS, deadline=None, database=None,
            phases=[Phase.generate], derandomize=True,
            suppress_health_check=[HealthCheck.too_slow]))
