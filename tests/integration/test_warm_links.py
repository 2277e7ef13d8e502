"""Warm SSH links: remote releases over the daemon's multiplexed masters, against fresh
connections; a dead master is replaced by a fresh connection without anyone noticing; and the
warm link (a socket the master forwards to the peer's daemon): a release confirmed in about one
round trip, no process started on the peer, ssh exec when the peer's daemon is not there."""

from __future__ import annotations

import json
import os
import signal
import stat
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from bench.sshwarm import cold_rounds, masters, postgres_uid, probe, release_seconds
from lab import INTERFACE, VIP, Lab, Node, VipSampler
from repmgr_vip.adapters import sshmux
from repmgr_vip.config import statepaths
from tests.integration.vipconf import (
    PYTHON,
    config_path,
    has_vip,
    hooked_cluster,
    journal_entries,
    never_during,
    start_daemon,
    stop_daemon,
    wait_failover_done,
    wait_until,
)

pytestmark = pytest.mark.lab

ROUNDS = 3


def _ms(values: list[float]) -> list[int]:
    return [round(v * 1000) for v in values]


def test_release_over_warm_links_is_faster_and_a_dead_master_falls_back(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    hooked_cluster(lab)
    node1 = lab.nodes[0]
    peers = {n.ip for n in lab.nodes[1:]}

    # no master: each ssh connects and authenticates anew
    cold = cold_rounds(lab, node1, ROUNDS)
    cold_ssh = cold_rounds(lab, node1, ROUNDS, "true")
    probe(lab, node1, "exit")
    assert masters(lab, node1) == {}

    control = node1.dir / f"repmgr-vip-ssh-{postgres_uid()}"
    info = os.lstat(control)
    assert stat.S_ISDIR(info.st_mode) and info.st_mode & 0o777 == 0o700
    assert info.st_uid == postgres_uid()

    daemon = start_daemon(lab, node1)
    try:
        lab.wait_for(lambda: set(masters(lab, node1)) == peers, 30, interval=0.5,
                     what="the daemon's SSH masters to node2 and node3")
        warm = [release_seconds(lab, node1) for _ in range(ROUNDS)]
        warm_ssh = [release_seconds(lab, node1, "true") for _ in range(ROUNDS)]
        print(f"on 2 peers in parallel: remote release cold {_ms(cold)} ms, warm {_ms(warm)} "
              f"ms; ssh true cold {_ms(cold_ssh)} ms, warm {_ms(warm_ssh)} ms")
        # the remote side (Python, sudo, ip) costs the same either way; the link's own
        # set-up (TCP, key exchange, authentication) is what warm links remove
        # (seen: transport 5-17 % of cold; the whole release 25-72 %, as the remote Python
        # start-up it keeps weighs more or less against the machine's load)
        assert statistics.median(warm_ssh) < statistics.median(cold_ssh) / 3, (cold_ssh,
                                                                               warm_ssh)
        assert statistics.median(warm) < statistics.median(cold), (cold, warm)

        # a master killed under everyone's feet: the next ssh finds a stale socket, connects
        # afresh (and becomes the new master); nobody sees an error
        killed = masters(lab, node1)
        for pid in killed.values():
            os.kill(pid, signal.SIGKILL)
        assert masters(lab, node1) == {}
        release_seconds(lab, node1)
        again = masters(lab, node1)
        assert set(again) == peers and not set(again.values()) & set(killed.values())
        assert all(release_seconds(lab, node1) < max(cold) for _ in range(2))
    finally:
        stop_daemon(daemon)


# Run as postgres inside a node: one remote release round to TARGETS ("all": every other
# node, in parallel, as a fencing round asks them) over the warm link (LinkRelease, which
# falls back to ssh exec) or over ssh exec (SshRelease), timed from the first start to the
# last confirmation; "answers": whether each target's daemon greets through its link.
LINK_PROBE = r"""
import json, sys, time
from pathlib import Path
from repmgr_vip.adapters import cluster, sshmux
from repmgr_vip.adapters.link import LinkRelease
from repmgr_vip.app.fencing import SshRelease
from repmgr_vip.config.schema import load_config

config = load_config(Path(sys.argv[1]))
mode, targets = sys.argv[2], sys.argv[3].split(",")
nodes = [n for n in cluster.registered_nodes(config)
         if n.node_id != config.repmgr.node_id and (targets == ["all"] or n.node_name in targets)]
if mode in ("answers", "sockets"):
    paths = {n.node_name: sshmux.link_path(config, n) for n in nodes}
    print(json.dumps({name: sshmux.link_answers(path) if mode == "answers"
                      else path is not None and path.is_socket() for name, path in paths.items()}))
    sys.exit(0)
remote = (LinkRelease(lambda: config, lambda: SshRelease(config)) if mode == "link"
          else SshRelease(config))
began = time.monotonic()
sessions = {n.node_name: remote.start_release(n) for n in nodes}
while not all(s.finished() for s in sessions.values()):
    time.sleep(0.0005)
seconds = time.monotonic() - began
out = {}
for name, s in sessions.items():
    r = s.result()
    out[name] = {"ok": r.ok, "via": getattr(s, "via", "ssh"), "macs": list(r.macs),
                 "out": r.stdout.strip()[-200:]}
print(json.dumps({"seconds": seconds, "nodes": out}))
"""


def _probe(lab: Lab, node: Node, mode: str, targets: str = "all") -> dict[str, Any]:
    result = lab.run(node, [PYTHON, "-c", LINK_PROBE, str(config_path(node)), mode, targets],
                     timeout=60)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def _readd(lab: Lab, node: Node) -> None:
    """The VIP back on node as root (its daemon, primary there, keeps it)."""
    lab.run(node, ["ip", "addr", "replace", VIP, "dev", INTERFACE], user="root")


class DaemonsUp:
    """The daemon on every node, with the warm links from `origin` to every other node up."""

    def __init__(self, lab: Lab, origin: Node, unlinked: tuple[str, ...] = ()) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {n.name: start_daemon(lab, n)
                                                        for n in lab.nodes}
        wait_until(lab, "every daemon serves its control socket", lambda: all(
            statepaths.control_socket(n.dir).exists() for n in lab.nodes), 30)
        wait_until(lab, f"{origin.name}'s warm links to every peer's daemon", lambda: not any(
            why for name, why in _probe(lab, origin, "answers").items()
            if name not in unlinked), 60, interval=0.5)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        assert stop_daemon(proc) == 0

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                stop_daemon(proc)


def _rounds(lab: Lab, origin: Node, holder: Node, rounds: int) -> dict[str, list[float]]:
    """Interleaved parallel release rounds to every peer of origin, over the link and over
    ssh exec (the same warm masters), each starting with the VIP on holder."""
    seconds: dict[str, list[float]] = {"link": [], "ssh": []}
    for _ in range(rounds):
        for mode in ("link", "ssh"):
            _readd(lab, holder)
            result = _probe(lab, origin, mode)
            assert all(n["ok"] for n in result["nodes"].values()), result
            assert all(n["via"] == mode for n in result["nodes"].values()), result
            assert not has_vip(lab, holder)
            seconds[mode].append(result["seconds"])
    return seconds


def test_a_release_over_the_warm_link_is_one_round_trip_and_starts_nothing_there(
        lab_factory: Callable[..., Lab]) -> None:
    """node2's daemon side asks node1's daemon through the link: node1 lets go at once (its
    daemon, no process started there), holds off re-adding for the hold, and replies its MAC;
    with node1's daemon stopped the very same round releases over ssh exec.

    RV_LINK_NODES=7 runs it with 7 nodes (the figures printed are the point then)."""
    lab = lab_factory(nodes=int(os.environ.get("RV_LINK_NODES", "3")))
    hooked_cluster(lab)
    node1, node2 = lab.nodes[0], lab.nodes[1]
    assert lab.vip_holders() == ["node1"]
    daemons = DaemonsUp(lab, node2)
    try:
        # the keeper checks its masters in-process (the mux protocol's alive check, as
        # `ssh -O check` does): OpenSSH's own masters answer it
        masters = [p for p in node2.dir.glob("repmgr-vip-ssh-*/*")
                   if stat.S_ISSOCK(p.lstat().st_mode) and not p.name.startswith("link-")]
        assert masters and all(sshmux.mux_alive(str(p)) for p in masters), masters
        result = _probe(lab, node2, "link", "node1")
        one = result["nodes"]["node1"]
        assert one["ok"] and one["via"] == "link", result
        assert one["macs"] == [node1.mac.lower()]
        assert not has_vip(lab, node1)
        [entry] = journal_entries(node1, source="release", action="release")
        assert entry["inputs"]["via"] == "link" and entry["outcome"] == "released"
        assert entry["pid"] == daemons.procs["node1"].pid  # the daemon itself, no new process
        assert statepaths.release_request_marker(node1.dir).exists()
        print(f"\nwarm link: node1 released and confirmed in "
              f"{result['seconds'] * 1000:.1f} ms")
        assert result["seconds"] < 1.0  # ~ms; generous, so load cannot flake it
        # node1 is still primary: its daemon keeps off for the hold (2.5 periods), then
        # takes the VIP back (no newer timeline showed)
        never_during(lambda: has_vip(lab, node1), 1.5)
        wait_until(lab, "node1's daemon takes the VIP back after the hold",
                   lambda: has_vip(lab, node1), 15)

        seconds = _rounds(lab, node2, node1, int(os.environ.get("RV_LINK_ROUNDS", "10")))
        link, ssh = (statistics.median(seconds[m]) * 1000 for m in ("link", "ssh"))
        print(f"release round from node2 to {len(lab.nodes) - 1} peers in parallel, median "
              f"of {len(seconds['link'])}: warm link {link:.1f} ms, ssh exec {ssh:.1f} ms "
              f"(link {[round(s * 1000, 1) for s in seconds['link']]}, ssh "
              f"{[round(s * 1000) for s in seconds['ssh']]})")
        assert link < ssh

        daemons.stop("node1")
        _readd(lab, node1)
        marker = statepaths.release_request_marker(node1.dir)
        before = marker.stat().st_mtime if marker.exists() else 0.0  # (cleared after the hold)
        time.sleep(0.05)
        result = _probe(lab, node2, "link", "node1")
        one = result["nodes"]["node1"]
        # `release` over ssh names the MAC it removed the VIP from too (released-from-mac)
        assert one["ok"] and one["via"] == "ssh" and one["macs"] == [node1.mac.lower()], result
        assert not has_vip(lab, node1)
        assert marker.stat().st_mtime > before  # `repmgr-vip release` over ssh held too
        print(f"node1's daemon stopped: released over ssh exec in "
              f"{result['seconds'] * 1000:.0f} ms")
    finally:
        daemons.close()


def test_a_failover_with_daemons_up_fences_over_the_warm_links(
        lab_factory: Callable[..., Lab]) -> None:
    """kill -9 of node1's postmaster, daemons up: node2's promotion (run by its daemon) asks
    every peer's daemon over its link; the VIP moves, never on two nodes (RV_LINK_NODES as
    above)."""
    lab = lab_factory(nodes=int(os.environ.get("RV_LINK_NODES", "3")))
    hooked_cluster(lab)
    node1, node2 = lab.nodes[0], lab.nodes[1]
    peers = [n for n in lab.nodes if n is not node2]
    daemons = DaemonsUp(lab, node2)
    try:
        with VipSampler(lab) as sampler:
            fault = time.time()  # the hooks' own releases over ssh while the lab came up: before
            lab.kill_postgres(node1)
            wait_failover_done(lab, node2)
        sampler.assert_never_two()
    finally:
        daemons.close()
    asked = {peer.name: [e for e in journal_entries(peer, source="release", action="release")
                         if e["time"] >= fault] for peer in peers}
    for name, entries in asked.items():
        assert entries and all(e["inputs"]["via"] == "link" for e in entries), (name, entries)
    [verdict] = [e for e in journal_entries(node2, source="promote")
                 if "fencing_ms" in e.get("inputs", {})]
    release_ms = {name: entries[0]["inputs"]["release_ms"] for name, entries in asked.items()}
    print(f"\nfailover over the warm links: fencing {verdict['inputs']['fencing_ms']} ms "
          f"(the peers' daemons' own release steps: {release_ms} ms)")


def _restart_sshd(lab: Lab, node: Node, *options: str) -> None:
    """node's sshd again, with more options (sessions already open keep the old ones)."""
    pid_file = node.socket_dir / "sshd.pid"
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGTERM)
    wait_until(lab, "the old sshd gone", lambda: not os.path.exists(f"/proc/{pid}"), 10)
    extra = [a for o in options for a in ("-o", o)]
    lab.run(node, [*lab._sshd_argv(node), *extra], user="root", timeout=10)
    wait_until(lab, "the new sshd's pid file", lambda: pid_file.exists() and
               pid_file.read_text().strip() != str(pid), 10)


def test_sshd_refusing_streamlocal_forwarding_keeps_the_ssh_exec_release(
        lab_factory: Callable[..., Lab]) -> None:
    """node1's sshd with AllowStreamLocalForwarding=no: node2's master to node1 forwards the
    socket locally but every connection through it is refused there; the release to node1
    goes over ssh exec in the same round, node3's over its link."""
    lab = lab_factory(nodes=3)
    hooked_cluster(lab)
    node1, node2, node3 = lab.nodes
    _restart_sshd(lab, node1, "AllowStreamLocalForwarding=no")
    probe(lab, node2, "exit")  # masters opened by the hooks so far were allowed to forward
    daemons = DaemonsUp(lab, node2, unlinked=("node1",))
    try:
        wait_until(lab, "node2's master to node1 forwards the socket", lambda: _probe(
            lab, node2, "sockets")["node1"], 60, interval=0.5)
        assert _probe(lab, node2, "answers")["node1"]  # nobody greets through it
        asked_at = time.time()  # the hooks' own releases over ssh while the lab came up: before
        result = _probe(lab, node2, "link")
        nodes = result["nodes"]
        assert nodes["node1"]["ok"] and nodes["node1"]["via"] == "ssh", result
        assert nodes["node3"]["ok"] and nodes["node3"]["via"] == "link", result
        assert not has_vip(lab, node1)
        # not node1's daemon: ssh exec, journaled by the `release` that ssh ran
        vias = {node.name: [e["inputs"]["via"] for e in journal_entries(node, source="release")
                            if e["time"] >= asked_at] for node in (node1, node3)}
        assert vias == {"node1": ["ssh"], "node3": ["link"]}, vias
        print(f"\nnode1's sshd refuses streamlocal forwarding: round released over ssh exec "
              f"(node1) and the link (node3) in {result['seconds'] * 1000:.0f} ms")
    finally:
        daemons.close()
