"""The hooks' fast path in the lab: kill -9 of the primary with the daemons up (the daemon does
the VIP step), with the daemons down (the hook does it), and with the new primary's daemon
stopped by SIGSTOP (the hook gives up on it after the greeting bound and does it itself).

In every case the VIP moves to the new primary and the sampler never sees two holders. Each
run prints how long the promote hook took, from its process start to `repmgr standby
promote` starting, as journaled by the hook (`repmgr-promote`, inputs.hook_ms).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from bench.dark import dark_from_holders
from bench.ideal import wait_warm_links
from bench.sshwarm import masters
from lab import INTERFACE, IP_BIN, VIP_IP, Lab, VipSampler
from tests.integration.vipconf import (
    config_path,
    hooked_cluster,
    journal_entries,
    start_daemon,
    stop_daemon,
    wait_failover_done,
    wait_until,
)

pytestmark = pytest.mark.lab

FAILOVER_TIMEOUT = 60.0
# "lan-window": daemons up and [vip] probe_timeout = 0.02, an ARP window fitted to a LAN
# (answers come within a millisecond), so the fencing round is no longer the ARP window
MODES = ("daemons-up", "daemons-down", "new-primary-daemon-stopped", "lan-window")
LAN_PROBE_TIMEOUT = "0.02"


class Daemons:
    """The daemon on every node (or none), stopped and resumed by the test."""

    def __init__(self, lab: Lab, up: bool) -> None:
        self.lab = lab
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.stopped: list[int] = []
        if up:
            self.procs = {n.name: start_daemon(lab, n) for n in lab.nodes}
            wait_until(lab, "every daemon has run a cycle", lambda: all(
                (n.dir / "repmgr-vip-daemon.json").exists() for n in lab.nodes), 30)
            wait_until(lab, "every daemon serves its control socket", lambda: all(
                (n.dir / "repmgr-vip-control.sock").exists() for n in lab.nodes), 30)
            peers = {n.name: {p.ip for p in lab.nodes if p is not n} for n in lab.nodes}
            wait_until(lab, "warm SSH masters from every node", lambda: all(
                set(masters(lab, n)) == peers[n.name] for n in lab.nodes), 60, interval=0.5)
            assert wait_warm_links(lab, timeout=60.0) is not None, "no warm link everywhere"

    def sigstop(self, name: str) -> None:
        pid = self.procs[name].pid  # setpriv execs the daemon: the same pid
        os.kill(pid, signal.SIGSTOP)
        self.stopped.append(pid)

    def close(self) -> None:
        for pid in self.stopped:
            os.kill(pid, signal.SIGCONT)
        for proc in self.procs.values():
            if proc.poll() is None:
                stop_daemon(proc)


@pytest.fixture
def three(lab_factory: Callable[..., Lab]) -> Iterator[Lab]:
    lab = lab_factory(nodes=3)
    hooked_cluster(lab)
    assert lab.vip_holders() == ["node1"]
    yield lab


def _set_probe_window(lab: Lab, seconds: str) -> None:
    """[vip] probe_timeout on every node (read afresh by every hook and daemon start)."""
    for node in lab.nodes:
        path = config_path(node)
        path.write_text(path.read_text().replace("[vip]\n", f"[vip]\nprobe_timeout = {seconds}\n",
                                                 1))


def _only(entries: list[Mapping[str, Any]], what: str) -> Mapping[str, Any]:
    assert len(entries) == 1, (what, entries)
    return entries[0]


@pytest.mark.parametrize("mode", MODES)
def test_kill9_failover_moves_the_vip_on_every_path(three: Lab, mode: str) -> None:
    lab = three
    node1, node2, _ = lab.nodes
    if mode == "lan-window":
        _set_probe_window(lab, LAN_PROBE_TIMEOUT)
    daemons = Daemons(lab, up=mode != "daemons-down")
    try:
        if mode == "new-primary-daemon-stopped":
            daemons.sigstop("node2")  # priority: node2 wins the election
        # 2 ms: the dark window of the daemon path is a few milliseconds
        with VipSampler(lab, interval=0.002 if mode == "daemons-up" else 0.01) as sampler:
            fault, fault_wall = time.monotonic(), time.time()
            lab.kill_postgres(node1)
            wait_failover_done(lab, node2, FAILOVER_TIMEOUT)
        sampler.assert_never_two()
    finally:
        daemons.close()

    started = _only(journal_entries(node2, source="promote", action="repmgr-promote"),
                    "one promote hook started repmgr")["inputs"]
    acquired = _only(journal_entries(node2, source="promote", action="acquire",
                                     outcome="held"), "the VIP added once")["inputs"]
    verdict = _only([e for e in journal_entries(node2, source="promote")
                     if "fencing_ms" in e.get("inputs", {})], "one fencing verdict")["inputs"]
    expected = "daemon" if mode in ("daemons-up", "lan-window") else "hook"
    assert started["via"] == acquired["via"] == verdict["via"] == expected, (started, acquired)
    # the other two nodes came from the list on disk: the old primary was asked before
    # PostgreSQL answered the node query (a standby keeps it from start-repmgrd on)
    assert verdict["cached"] == 2, verdict
    # with no daemon to ask, the quick start sent the old primary's release before the full
    # CLI had loaded, and the round adopted it (adapters/early.py); never beside a daemon
    assert verdict["early"] == (["node1"] if mode == "daemons-down" else []), verdict
    if mode == "daemons-down":
        assert started["daemon"] == "not running"
    if mode == "new-primary-daemon-stopped":
        assert "no greeting" in started["daemon"], started
    if mode == "daemons-up":
        # node2's daemon heard only node1 answer for the VIP a moment before: node1 is asked
        # first and alone, its release frees the VIP, and node3 is asked only after the add;
        # node3's later confirmation still counts, so no node is left to the release retrier
        # (every node's journal on one clock: the lab's host)
        removed = {node.name: [e["inputs"]["removed_at"] for e in journal_entries(
            node, source="release", action="release")
            if e["inputs"].get("via") == "link" and e["time"] >= fault_wall]
            for node in (node1, lab.nodes[2])}
        assert len(removed["node1"]) == len(removed["node3"]) == 1, removed
        assert removed["node1"][0] < removed["node3"][0], removed
        assert verdict["released"] == ["node1"], verdict
        assert acquired["unconfirmed"] == [], acquired
    # the held entry follows the settle wait; its added_at is when the sampler saw the VIP
    # arrive (the bench's "VIP added" instant), on the lab host's one clock
    arrived = sampler.first_time(lambda holders: holders == ("node2",))
    assert arrived is not None, sampler.transitions()
    assert abs(acquired["added_at"] - (fault_wall + arrived - fault)) < 0.25, (
        acquired, arrived - fault)
    steps = ", ".join(f"{k} {v} ms" for k, v in started.items() if k.endswith("_ms"))
    dark = dark_from_holders(sampler.samples, fault, "node2")
    assert dark is not None, sampler.transitions()
    print(f"\nfast path [{mode}]: repmgr standby promote started {started['hook_ms']} ms after "
          f"the promote hook started ({steps}; lock {verdict['lock_ms']} ms, fencing "
          f"{verdict['fencing_ms']} ms, by the {expected}); no node held the VIP for "
          f"{dark * 1000:.0f} ms (sampler every {sampler.period_stats()['median_ms']} ms)")


def test_switchover_with_daemons_moves_the_vip_through_them(three: Lab) -> None:
    """repmgr's own switchover never runs promote_command: the events move the VIP, and with
    the daemons up their VIP steps run in the daemons (or the daemon's cycle was first)."""
    lab = three
    node1, node2, _ = lab.nodes
    daemons = Daemons(lab, up=True)
    try:
        with VipSampler(lab) as sampler:
            result = lab.repmgr(node2, "standby", "switchover", "--siblings-follow",
                                "--always-promote", check=False, timeout=180)
            assert result.returncode == 0, result.stdout + result.stderr
            wait_until(lab, "VIP on node2 alone", lambda: lab.vip_holders() == ["node2"], 20)
            wait_until(lab, "node1 in recovery", lambda: lab.is_in_recovery(node1) is True, 30)
        sampler.assert_never_two()
    finally:
        daemons.close()
    events = [e for n in lab.nodes for e in journal_entries(n)
              if str(e["source"]).startswith("event ")]
    assert events and all(e["inputs"]["via"] == "daemon" for e in events), events
    takers = [e for e in journal_entries(node2, action="acquire", outcome="held")
              if e["source"] == "daemon" or e["source"] == "event standby_promote"]
    assert takers, journal_entries(node2)
    print(f"\nswitchover with daemons: VIP taken on node2 by {takers[0]['source']}; events "
          f"{sorted({(e['node'], e['source']) for e in events})}")


# connects to the VIP's PostgreSQL port every 10 ms (1 s timeout, as the bench's writer), one
# JSON line per attempt: when it began, how it ended, how long it took
_ATTEMPTS = """
import json, socket, sys, time
while True:
    s = socket.socket(); s.settimeout(1.0); began = time.time()
    try:
        s.connect((sys.argv[1], 5432)); outcome = "connected"
    except ConnectionRefusedError:
        outcome = "refused"
    except OSError as exc:
        outcome = type(exc).__name__
    finally:
        s.close()
    print(json.dumps([began, outcome, time.time() - began]), flush=True)
    time.sleep(0.01)
"""


@pytest.mark.parametrize("daemons_up", [True, False], ids=["daemons-up", "hooks-only"])
def test_a_client_still_sending_to_the_old_mac_is_refused_not_left_waiting(
        three: Lab, daemons_up: bool) -> None:
    """The client's neighbour entry names the old primary's MAC and never learns the new one
    (permanent): every attempt after node1's release reaches node1. For 2 s node1 answers
    them with a reset, so they fail at once and the next attempt comes 10 ms later, where
    node1's kernel alone would drop them and each would wait its 1 s timeout. With daemons,
    node1's daemon refuses (released over the warm link); without, the `release` node2's
    hook ran over ssh started the root helper through sudo (`refuse-stale`)."""
    lab = three
    node1, node2, _ = lab.nodes
    neigh = [IP_BIN, "neigh", "replace", VIP_IP, "lladdr", node1.mac, "dev", INTERFACE,
             "nud", "permanent"]
    daemons = Daemons(lab, up=daemons_up)
    attempts = None
    try:
        lab.run(None, neigh, user="root")
        attempts = lab.popen(None, [sys.executable, "-c", _ATTEMPTS, VIP_IP], user="root")
        lab.kill_postgres(node1)
        wait_failover_done(lab, node2, FAILOVER_TIMEOUT)
        time.sleep(2.5)
    finally:
        if attempts is not None:
            attempts.kill()
        daemons.close()
        lab.run(None, [IP_BIN, "neigh", "del", VIP_IP, "dev", INTERFACE], user="root",
                check=False)
    assert attempts is not None and attempts.stdout is not None
    seen = [json.loads(line) for line in attempts.stdout.read().splitlines() if line.strip()]
    via = "link" if daemons_up else "ssh"
    released = [e["inputs"] for e in journal_entries(node1, source="release", action="release")
                if e["inputs"].get("via") == via and e["outcome"] == "released"]
    assert released, f"node1 released over {via}: {journal_entries(node1, source='release')}"
    assert released[-1]["refusing"], released[-1]
    start = released[-1]["removed_at"]
    window = [(outcome, took) for began, outcome, took in seen if start <= began < start + 1.5]
    assert len(window) >= 20, window  # attempts every 10 ms or so, none waiting 1 s
    assert all(outcome == "refused" and took < 0.5 for outcome, took in window), window
    print(f"\nafter node1's release over {via}: {len(window)} attempts in 1.5 s through "
          f"node1's MAC, all refused, slowest {max(t for _, t in window) * 1000:.0f} ms")
