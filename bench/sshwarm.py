"""Fencing's SSH step timed over cold and warm links (fresh connections vs the daemon's masters).

Fencing asks every other node, in parallel, to run `repmgr-vip release` over SSH
(fencing.Fencing.expect). PROBE does exactly that as postgres inside a node and prints the
wall time; `cold` rounds first close every master (`ssh -O exit`), so each ssh connects and
authenticates anew; `warm` rounds run while masters answer (the daemon keeps them).
"""

from __future__ import annotations

import json
import pwd
import re
import statistics
from typing import Any

from lab import Lab, Node
from tests.integration.vipconf import PYTHON, config_path

PROBE = r"""
import json, sys, time
from pathlib import Path
from repmgr_vip.adapters import cluster, sshmux
from repmgr_vip.config.schema import load_config
from repmgr_vip.adapters.process import run
from repmgr_vip.adapters.remote import remote_vip_command, start_remote

config = load_config(Path(sys.argv[1]))
mode = sys.argv[2]
peers = [n for n in cluster.registered_nodes(config) if n.node_id != config.repmgr.node_id]
if mode in ("release", "true"):
    began = time.monotonic()
    sessions = [start_remote(config, n.host, remote_vip_command(config, n.node_name,
                                                                n.node_id, "release")
                             if mode == "release" else ["true"])
                for n in peers]
    codes = [s.result().returncode for s in sessions]
    print(json.dumps({"seconds": time.monotonic() - began, "codes": codes}))
elif mode == "warm":  # what the daemon's keeper does: a master to every peer
    masters = [sshmux.start_master(config, n.host) for n in peers]
    print(json.dumps({n.host: m.wait(30) if m else -1 for n, m in zip(peers, masters)}))
else:  # "-O check" or "-O exit" for every peer: {host: [exit status, output]}
    out = {}
    for n in peers:
        r = run(sshmux._ssh(config, n.host, "-O", mode), timeout=10)
        out[n.host] = [r.returncode, r.stdout + r.stderr]
    print(json.dumps(out))
"""


def postgres_uid() -> int:
    return pwd.getpwnam("postgres").pw_uid


def probe(lab: Lab, node: Node, mode: str) -> dict[str, Any]:
    python = PYTHON
    result = lab.run(node, [python, "-c", PROBE, str(config_path(node)), mode], timeout=60)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def release_seconds(lab: Lab, node: Node, mode: str = "release") -> float:
    """One parallel remote release on every other node (mode "true": only the transport,
    `ssh HOST true`); every one must exit 0."""
    result = probe(lab, node, mode)
    if result["codes"] != [0] * (len(lab.nodes) - 1):
        raise RuntimeError(f"remote release failed: {result}")
    return float(result["seconds"])


def masters(lab: Lab, node: Node) -> dict[str, int]:
    """host -> pid of the master that answers for that peer (absent when none does)."""
    found = {}
    for host, (code, text) in probe(lab, node, "check").items():
        pid = re.search(r"pid=(\d+)", str(text))
        if code == 0 and pid:
            found[str(host)] = int(pid.group(1))
    return found


def cold_rounds(lab: Lab, node: Node, rounds: int, mode: str = "release") -> list[float]:
    out = []
    for _ in range(rounds):
        probe(lab, node, "exit")
        out.append(release_seconds(lab, node, mode))
    return out


def measure(lab: Lab, node: Node, rounds: int = 5) -> dict[str, Any]:
    """Cold and warm rounds, interleaved so that load on the machine hits both alike.

    Needs the daemon running on `node` (its masters make the warm rounds warm; a cold
    round's own ssh leaves a master behind too, so warm rounds never wait for the keeper).
    """
    out: dict[str, Any] = {"peers": len(lab.nodes) - 1}
    for mode in ("release", "true"):
        cold: list[float] = []
        warm: list[float] = []
        for _ in range(rounds):
            cold += cold_rounds(lab, node, 1, mode)
            warm.append(release_seconds(lab, node, mode))
        out[mode] = {"cold_s": cold, "warm_s": warm, "cold_median_s": statistics.median(cold),
                     "warm_median_s": statistics.median(warm)}
    return out
