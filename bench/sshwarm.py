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
import time
from collections.abc import Callable
from typing import Any

from bench.hooklog import fencing_seconds, first, read_log
from lab import Lab, Node
from tests.integration.vipconf import PYTHON, config_path, hooked_cluster

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


def failover_fencing(nodes: int, warm: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Hooks only (no daemon releases the VIP early): kill -9 the primary's postmaster and
    read the promote hook's own fencing duration. Warm: every standby has an SSH master to
    every other node, as the daemon keeps them; cold: none (each ssh authenticates anew)."""
    with Lab(nodes=nodes) as lab:
        hooked_cluster(lab)
        lab.wait_for(lambda: lab.vip_holders() == ["node1"], 60, what="VIP on node1")
        for node in lab.nodes:
            probe(lab, node, "exit")  # masters left by the start-up hooks' ssh calls
        if warm:
            for node in lab.nodes[1:]:
                probe(lab, node, "warm")
        t0 = time.time()
        lab.kill_postgres(lab.nodes[0])
        found: list[Node] = []

        def moved() -> bool:
            holders = lab.vip_holders()
            found[:] = [lab.node(h) for h in holders if h != "node1"]
            return len(holders) == 1 and bool(found)

        lab.wait_for(moved, 120, interval=0.1, what="VIP on the new primary")
        new = found[0]
        line = None
        deadline = time.monotonic() + 30
        while line is None and time.monotonic() < deadline:
            line = first(read_log(new.dir / "repmgr-vip.log"), r"^promote: fencing: ", t0)
            time.sleep(0.2)
        seconds = fencing_seconds(line) if line is not None else None
        if seconds is None:
            raise RuntimeError(f"{new.name}: no 'promote: fencing: ... (N s)' line")
    say(f"    fencing in the promote hook, {nodes} nodes, {'warm' if warm else 'cold'} links: "
        f"{seconds * 1000:.0f} ms ({line.message if line else ''})")
    return {"warm": warm, "fencing_s": seconds, "new": new.name}


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


def fencing_table(fencing: dict[str, Any]) -> str:
    """failover_fencing's figures as their own Markdown table ("" when none were taken)."""
    if not fencing.get("runs"):
        return ""
    rows = [f"| promote hook's fencing, {fencing.get('nodes', '?')} nodes, hooks only | "
            "median | runs |", "|---|---|---|"]
    for warm, label in ((False, "fresh SSH connections (cold links)"),
                        (True, "SSH masters up, as the daemon keeps them (warm links)")):
        vals = [float(r["fencing_s"]) for r in fencing["runs"] if r["warm"] is warm]
        if vals:
            rows.append(f"| {label} | {statistics.median(vals) * 1000:.0f} ms | "
                        + ", ".join(f"{v * 1000:.0f}" for v in vals) + " ms |")
    note = ("A fresh lab per run, no daemon (so the old primary keeps the VIP until fencing's "
            "remote release reaches it), kill -9 of the primary's postmaster; the figure is the "
            "promote hook's own `fencing: ... (N s)` line. Cold: every SSH master closed first; "
            "warm: each standby has a master to every other node. BENCH_FENCING_ROUNDS "
            "(default 2) pairs, interleaved.")
    return "\n\n" + "\n".join(rows) + "\n\n" + note
