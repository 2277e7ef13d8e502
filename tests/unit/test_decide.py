"""The decision rules, tested directly on plain data (no I/O anywhere in decide.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from repmgr_vip.adapters.cluster import NodeView
from repmgr_vip.core.decide import (
    SPLIT_BRAIN,
    Action,
    Memory,
    Peer,
    Policy,
    Snapshot,
    after_fencing,
    decide_cycle,
    legitimacy,
)

POLICY = Policy(isolation_grace=2.0)
WITNESS = 99


def primary(node_id: int, timeline: int) -> NodeView:
    return NodeView(node_id, reachable=True, in_recovery=False, timeline=timeline)


def standby(node_id: int, timeline: int) -> NodeView:
    return NodeView(node_id, reachable=True, in_recovery=True, timeline=timeline)


def down(node_id: int, error: str = "timeout expired") -> NodeView:
    return NodeView(node_id, reachable=False, error=error)


def snap(local: NodeView, *peers: NodeView, holds: bool = True, now: float = 100.0,
         foreign: tuple[str, ...] | None = None, surely_down: bool = False,
         self_fence_age: float | None = None, reannounce: bool = False) -> Snapshot:
    return Snapshot(
        now=now, local_name=f"node{local.node_id}", local=local, local_surely_down=surely_down,
        peers=tuple(Peer(p.node_id, f"node{p.node_id}",
                         "witness" if p.node_id == WITNESS else "standby", p) for p in peers),
        holds_vip=holds, interface_up=True, foreign_macs=foreign, self_fence_age=self_fence_age,
        reannounce_due=reannounce,
    )


FRESH = Memory(majority_seen_at=100.0)


def test_healthy_primary_keeps_and_says_why() -> None:
    decision, _ = decide_cycle(snap(primary(1, 3), standby(2, 3), standby(3, 3)), FRESH, POLICY)
    assert decision.action is Action.KEEP
    assert decision.reason == "holding: primary on timeline 3, 3/3 nodes reachable"


def test_primary_without_vip_acquires() -> None:
    decision, _ = decide_cycle(snap(primary(1, 1), standby(2, 1), holds=False), FRESH, POLICY)
    assert decision.action is Action.ACQUIRE


def test_standby_releases_at_once() -> None:
    decision, _ = decide_cycle(snap(standby(1, 1), primary(2, 2)), FRESH, POLICY)
    assert decision.action is Action.RELEASE


def test_local_down_for_sure_releases_at_once() -> None:
    decision, _ = decide_cycle(snap(down(1, "connection refused"), standby(2, 1),
                                    surely_down=True), FRESH, POLICY)
    assert decision.action is Action.RELEASE


def test_single_failed_local_query_does_not_flap() -> None:
    first, memory = decide_cycle(snap(down(1), standby(2, 1)), FRESH, POLICY)
    assert first.action is Action.KEEP
    second, _ = decide_cycle(snap(down(1), standby(2, 1), now=101), memory, POLICY)
    assert second.action is Action.RELEASE


def test_unanswering_holder_yields_to_another_holder() -> None:
    decision, _ = decide_cycle(snap(down(1), down(2), foreign=("02:00:00:00:00:02",)), FRESH,
                               POLICY)
    assert decision.action is Action.RELEASE


def test_returning_old_primary_releases() -> None:
    decision, _ = decide_cycle(snap(primary(1, 1), primary(2, 2), standby(3, 2)), FRESH, POLICY)
    assert decision.action is Action.RELEASE
    assert "newer timeline 2 > 1" in decision.reason


def test_isolated_primary_waits_out_the_grace_then_releases() -> None:
    seen = Memory(majority_seen_at=100.0, max_peer_timeline=1)
    within, memory = decide_cycle(snap(primary(1, 1), down(2), down(3), now=101.5), seen, POLICY)
    assert within.action is Action.KEEP
    after, _ = decide_cycle(snap(primary(1, 1), down(2), down(3), now=102.5), memory, POLICY)
    assert after.action is Action.RELEASE
    assert "isolated: 1/3 nodes reachable" in after.reason


def test_witness_counts_for_the_majority() -> None:
    decision, _ = decide_cycle(snap(primary(1, 1), down(2), standby(99, 1), now=110), FRESH,
                               POLICY)
    assert decision.action is Action.KEEP  # 2 of 3 reachable: witness and self


def test_promoted_after_losing_contact_may_hold() -> None:
    """Two nodes, no witness: the standby repmgr promoted has the newest timeline."""
    memory = Memory(majority_seen_at=90.0, max_peer_timeline=1)
    decision, _ = decide_cycle(snap(primary(2, 2), down(1), holds=False, now=110), memory,
                               POLICY)
    assert decision.action is Action.ACQUIRE


def test_restarted_isolated_daemon_never_trusts_its_own_timeline() -> None:
    decision, _ = decide_cycle(snap(primary(1, 5), down(2), holds=True, now=110), FRESH, POLICY)
    assert decision.action is Action.RELEASE


def test_conflict_is_reported_while_holding() -> None:
    decision, _ = decide_cycle(snap(primary(1, 1), standby(2, 1), foreign=("02:aa:bb:cc:dd:ee",)),
                               FRESH, POLICY)
    assert decision.action is Action.FENCE_CONFLICT
    assert "02:aa:bb:cc:dd:ee" in decision.reason


def test_self_fence_holds_until_majority_returns() -> None:
    alone = snap(primary(1, 1), down(2), down(3), holds=False, self_fence_age=60.0)
    decision, memory = decide_cycle(alone, FRESH, POLICY)
    assert decision.action is Action.KEEP and "self-fenced" in decision.reason
    # a fresh marker wins over a view that still shows the majority (it may be seconds old)
    fresh = snap(primary(1, 1), standby(2, 1), standby(3, 1), holds=False, self_fence_age=1.0)
    decision, memory = decide_cycle(fresh, memory, POLICY)
    assert decision.action is Action.KEEP and memory.self_fenced
    back = snap(primary(1, 1), standby(2, 1), standby(3, 1), holds=False, self_fence_age=60.0)
    decision, memory = decide_cycle(back, memory, POLICY)
    assert decision.action is Action.ACQUIRE and not memory.self_fenced


def test_same_timeline_primaries_neither_holds() -> None:
    """Two primaries on one timeline (a double promotion): nobody can tell which is right."""
    for holds in (True, False):
        decision, _ = decide_cycle(snap(primary(1, 2), primary(2, 2), standby(3, 2),
                                        holds=holds), FRESH, POLICY)
        assert decision.action is (Action.RELEASE if holds else Action.KEEP)
        assert decision.alarm == SPLIT_BRAIN
        assert "node1" in decision.reason and "node2" in decision.reason


def test_witness_is_never_taken_for_a_second_primary() -> None:
    """The witness runs a primary of its own (timeline 1): it must not look like split brain."""
    decision, _ = decide_cycle(snap(primary(1, 1), standby(2, 1), primary(WITNESS, 1)),
                               FRESH, POLICY)
    assert decision.action is Action.KEEP and decision.alarm == ""
    assert legitimacy("node1", primary(1, 1), [Peer(WITNESS, "witness", "witness",
                                                    primary(WITNESS, 1))]).action is Action.ACQUIRE


def test_periodic_announcement() -> None:
    decision, _ = decide_cycle(snap(primary(1, 1), standby(2, 1), reannounce=True), FRESH, POLICY)
    assert decision.action is Action.ANNOUNCE


def _peers(*views: NodeView) -> list[Peer]:
    return [Peer(v.node_id, f"node{v.node_id}", "standby", v) for v in views]


def test_start_legitimacy() -> None:
    assert legitimacy("node1", primary(1, 2), _peers(standby(2, 2))).action is Action.ACQUIRE
    assert legitimacy("node1", primary(1, 1), _peers(primary(2, 2))).action is Action.RELEASE
    same = legitimacy("node1", primary(1, 2), _peers(primary(2, 2)))
    assert same.action is Action.RELEASE and same.alarm == SPLIT_BRAIN
    assert legitimacy("node1", standby(1, 2), []).action is Action.RELEASE


def test_after_fencing_policies() -> None:
    assert after_fencing((), "refuse", fence_ran=False).action is Action.ACQUIRE
    assert after_fencing(("m",), "refuse", fence_ran=True).action is Action.REFUSE
    assert after_fencing(("m",), "promote-without-vip",
                         fence_ran=False).action is Action.PROMOTE_WITHOUT_VIP


# --- property: across random clusters and event interleavings, never two holders --------

views = st.sampled_from(["primary", "standby", "down", "refused"])


def _view(node_id: int, kind: str, timeline: int) -> NodeView:
    if kind == "primary":
        return primary(node_id, timeline)
    if kind == "standby":
        return standby(node_id, timeline)
    return down(node_id, "connection refused" if kind == "refused" else "timeout expired")


@st.composite
def worlds(draw: st.DrawFn) -> list[tuple[list[str], list[int], list[list[bool]], float]]:
    """A sequence of cluster states: roles, timelines, who can reach whom, time step."""
    nodes = draw(st.integers(min_value=2, max_value=4))
    steps = draw(st.integers(min_value=1, max_value=25))
    out = []
    timelines = [1] * nodes
    for _ in range(steps):
        roles = [draw(views) for _ in range(nodes)]
        for i, role in enumerate(roles):
            if role == "primary" and draw(st.booleans()):
                # a promotion: a new, higher timeline; or, as in a double promotion of two
                # standbys of one primary, the same new timeline another node also reached
                twin = draw(st.booleans()) and max(timelines) > 1
                timelines[i] = max(timelines) + (0 if twin else 1)
        reach = [[i == j or draw(st.booleans()) for j in range(nodes)] for i in range(nodes)]
        for i in range(nodes):  # links are symmetric
            for j in range(i):
                reach[i][j] = reach[j][i]
        out.append((roles, list(timelines), reach, draw(st.floats(0.1, 3.0))))
    return out


@settings(max_examples=2000, deadline=None)
@given(worlds())
def test_random_clusters_never_get_two_holders(world: list[Any]) -> None:
    """Random roles, promotions, partitions and timing, fed through every node's decision.

    Acting is modelled as the daemon does it: an acquisition first probes ARP, which sees
    every holder on the same segment (a reachable node). Checked after every step: no two
    mutually reachable holders; no standby, refused or twice-failed node holds; no holder
    sees a reachable primary on a newer timeline.
    """
    nodes = len(world[0][0])
    memories = [Memory(majority_seen_at=0.0) for _ in range(nodes)]
    holding = [False] * nodes
    failed_before = [False] * nodes
    now = 0.0
    for roles, timelines, reach, step in world:
        now += step
        for i in range(nodes):
            local = _view(i + 1, roles[i], timelines[i])
            peers = [(_view(j + 1, roles[j], timelines[j]) if reach[i][j] else down(j + 1))
                     for j in range(nodes) if j != i]
            others = [j for j in range(nodes) if j != i and holding[j] and reach[i][j]]
            s = snap(local, *peers, holds=holding[i], now=now,
                     surely_down=roles[i] == "refused",
                     foreign=tuple(f"mac{j}" for j in others) if holding[i] else None)
            decision, memories[i] = decide_cycle(s, memories[i], POLICY)
            if decision.action is Action.ACQUIRE and not others:  # the probe sees holders
                holding[i] = True
            elif decision.action is Action.RELEASE:
                holding[i] = False
            elif decision.action is Action.FENCE_CONFLICT:
                for j in others:  # fence_others asks every other node to release
                    holding[j] = False
            if roles[i] in ("standby", "refused") or (roles[i] == "down" and failed_before[i]):
                assert not holding[i], (i, roles, decision)
            if holding[i]:
                for j in range(nodes):
                    if j != i and reach[i][j] and roles[j] == "primary":
                        # never while a reachable primary is newer, or equally new
                        assert timelines[j] < timelines[i], (i, j, roles, timelines)
            failed_before[i] = roles[i] == "down"
        for a in range(nodes):  # after every node has run its cycle once
            for b in range(a):
                assert not (holding[a] and holding[b] and reach[a][b]), (roles, reach)


def test_a_release_requested_by_a_promoting_peer_holds_acquisition_off_briefly() -> None:
    """Fencing released us over SSH: the promoting node's new timeline takes a moment to show,
    and re-adding meanwhile would put the VIP on two nodes (the model's re-acquire race)."""
    def asked(age: float, holds: bool) -> Action:
        s = dataclasses.replace(snap(primary(1, 1), standby(2, 1), standby(3, 1), holds=holds),
                                release_request_age=age)
        return decide_cycle(s, FRESH, POLICY)[0].action

    assert asked(1.0, holds=False) is Action.KEEP  # not re-added while the promotion shows
    assert asked(1.0, holds=True) is Action.KEEP  # a VIP our own promote hook added is kept
    assert asked(POLICY.release_request_hold + 0.1, holds=False) is Action.ACQUIRE


# --- a dead primary keeps the VIP until someone else may take it (daemon.keep_while_down) ---

KEEPING = dataclasses.replace(POLICY, keep_while_down=10.0)


def _down_for(seconds: float, *peers: NodeView, holds: bool = True,
              foreign: tuple[str, ...] | None = None) -> Action:
    memory = dataclasses.replace(FRESH, local_down_since=100.0, local_failures=2)
    s = snap(down(1, "connection refused"), *peers, holds=holds, now=100.0 + seconds,
             surely_down=True, foreign=foreign)
    return decide_cycle(s, memory, KEEPING)[0].action


def test_a_dead_primary_keeps_the_vip_until_keep_while_down() -> None:
    assert _down_for(9.0, standby(2, 1), standby(3, 1)) is Action.KEEP
    assert _down_for(10.5, standby(2, 1), standby(3, 1)) is Action.RELEASE
    assert _down_for(1.0, standby(2, 1), holds=False) is Action.KEEP  # never acquires


def test_a_dead_primary_lets_go_at_once_for_a_primary_or_another_holder() -> None:
    assert _down_for(1.0, primary(2, 2), standby(3, 2)) is Action.RELEASE
    assert _down_for(1.0, standby(2, 1), foreign=("02:00:00:00:00:02",)) is Action.RELEASE


def test_a_dead_isolated_primary_lets_go_after_the_grace() -> None:
    memory = dataclasses.replace(FRESH, local_down_since=100.0, local_failures=2,
                                 majority_seen_at=100.0)
    s = snap(down(1, "connection refused"), down(2), down(3), now=103.0, surely_down=True)
    assert decide_cycle(s, memory, KEEPING)[0].action is Action.RELEASE


def test_the_down_clock_starts_at_the_first_failed_cycle() -> None:
    first = snap(down(1, "connection refused"), standby(2, 1), now=100.0, surely_down=True)
    _, memory = decide_cycle(first, FRESH, KEEPING)
    assert memory.local_down_since == 100.0
    back = snap(primary(1, 1), standby(2, 1), now=101.0)
    _, memory = decide_cycle(back, memory, KEEPING)
    assert memory.local_down_since is None


def test_a_standby_under_promotion_keeps_the_vip_it_took_first() -> None:
    s = dataclasses.replace(snap(standby(1, 1), standby(2, 1)), promoting=True)
    assert decide_cycle(s, FRESH, POLICY)[0].action is Action.KEEP
    s = dataclasses.replace(s, promoting=False)
    assert decide_cycle(s, FRESH, POLICY)[0].action is Action.RELEASE
