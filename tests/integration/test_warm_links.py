"""Warm SSH links: remote releases over the daemon's multiplexed masters, against fresh
connections; a dead master is replaced by a fresh connection without anyone noticing."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import stat
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.vipconf import (
    REPMGR_VIP,
    config_path,
    hooked_cluster,
    start_daemon,
    stop_daemon,
)
from tests.lab.lab import Lab, Node

pytestmark = pytest.mark.lab

ROUNDS = 3

# Runs as postgres inside a node: what fencing does (a remote `release` on every other node,
# in parallel, see fencing.Fencing.expect), timed; or an ssh control command per peer.
PROBE = r"""
import json, sys, time
from pathlib import Path
from repmgr_vip import cluster, sshmux
from repmgr_vip.config import load_config
from repmgr_vip.process import run
from repmgr_vip.remote import remote_vip_command, start_remote

config = load_config(Path(sys.argv[1]))
mode = sys.argv[2]
peers = [n for n in cluster.registered_nodes(config) if n.node_id != config.repmgr.node_id]
if mode == "release":
    began = time.monotonic()
    sessions = [start_remote(config, n.host, remote_vip_command(config, n.node_name,
                                                                n.node_id, "release"))
                for n in peers]
    codes = [s.result().returncode for s in sessions]
    print(json.dumps({"seconds": time.monotonic() - began, "codes": codes}))
else:  # "-O check" or "-O exit" for every peer: {host: [exit status, output]}
    out = {}
    for n in peers:
        r = run(sshmux._ssh(config, n.host, "-O", mode), timeout=10)
        out[n.host] = [r.returncode, r.stdout + r.stderr]
    print(json.dumps(out))
"""


def lab_uid() -> int:
    return pwd.getpwnam("postgres").pw_uid


def _probe(lab: Lab, node: Node, mode: str) -> dict[str, object]:
    python = str(Path(REPMGR_VIP).with_name("python"))
    result = lab.run(node, [python, "-c", PROBE, str(config_path(node)), mode], timeout=60)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def _release_seconds(lab: Lab, node: Node) -> float:
    result = _probe(lab, node, "release")
    assert result["codes"] == [0] * (len(lab.nodes) - 1), result
    return float(str(result["seconds"]))


def _masters(lab: Lab, node: Node) -> dict[str, int]:
    """host -> pid of the live master for that peer (missing when none answers)."""
    found = {}
    for host, (code, text) in _probe(lab, node, "check").items():  # type: ignore[misc]
        pid = re.search(r"pid=(\d+)", str(text))
        if code == 0 and pid:
            found[str(host)] = int(pid.group(1))
    return found


def _wait(lab: Lab, what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    lab.wait_for(predicate, timeout, interval=0.5, what=what)


def test_release_over_warm_links_is_faster_and_a_dead_master_falls_back(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    hooked_cluster(lab)
    node1 = lab.nodes[0]
    peers = {n.ip for n in lab.nodes[1:]}

    cold = []
    for _ in range(ROUNDS):
        _probe(lab, node1, "exit")  # no master: every ssh connects and authenticates anew
        assert _masters(lab, node1) == {}
        cold.append(_release_seconds(lab, node1))
    _probe(lab, node1, "exit")

    control = node1.dir / f"repmgr-vip-ssh-{lab_uid()}"
    info = os.lstat(control)
    assert stat.S_ISDIR(info.st_mode) and info.st_mode & 0o777 == 0o700
    assert info.st_uid == lab_uid()

    daemon = start_daemon(lab, node1)
    try:
        _wait(lab, "the daemon's SSH masters to node2 and node3",
              lambda: set(_masters(lab, node1)) == peers)
        warm = [_release_seconds(lab, node1) for _ in range(ROUNDS)]
        print(f"remote release on 2 peers in parallel: cold {[round(s * 1000) for s in cold]}"
              f" ms, warm {[round(s * 1000) for s in warm]} ms")
        assert statistics.median(warm) < statistics.median(cold) / 2, (cold, warm)

        # a master killed under everyone's feet: the next ssh finds a stale socket, connects
        # afresh (and becomes the new master); nobody sees an error
        masters = _masters(lab, node1)
        for pid in masters.values():
            os.kill(pid, signal.SIGKILL)
        assert _masters(lab, node1) == {}
        _release_seconds(lab, node1)
        after = _masters(lab, node1)
        assert set(after) == peers and not set(after.values()) & set(masters.values())
        assert all(_release_seconds(lab, node1) < max(cold) for _ in range(2))
    finally:
        stop_daemon(daemon)
