"""A frozen primary host (every process SIGSTOPped, no fence_command) with vip.lease set.

`python -m bench.frozen [LEASE ...]` (default 4) or BENCH_FROZEN_LEASE=4,20 with `python -m
bench`. The daemon runs on every node; node1 is frozen; its VIP expires by the lease, repmgrd
promotes a standby, the promote hook waits for ARP silence (at most the lease), then promotes
and takes the VIP. Figures, in seconds after the freeze: when the VIP left node1, repmgr's own
part (detection until the hook starts, plus `standby promote` until PostgreSQL accepts writes),
the wait the VIP step added before the promotion, and the client's outage.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.hooklog import PG_LINE, first, read_log
from bench.journalread import entries_after, promote_decided, seconds_of, vip_added
from bench.procwatch import ProcWatch
from bench.scenario import SETTLE, WRITER_INTERVAL, Say, ScenarioError, _wait
from demo.timeline import Timeline
from lab import VIP, Lab, Node
from tests.integration.test_lease import LeasedCluster

FENCING = "[fencing]\nssh_connect_timeout = 1\nssh_command_timeout = 2\n"


def _promoted(lab: Lab, old: Node) -> Node | None:
    for node in lab.nodes:
        if node is not old and lab.is_in_recovery(node) is False:
            return node
    return None


def frozen_failover(nodes: int, lease: int, say: Say) -> dict[str, Any]:
    with Lab(nodes=nodes) as lab:
        old = lab.nodes[0]
        lab.psql(old, "CREATE TABLE demo_writes(id bigserial PRIMARY KEY, "
                 "at timestamptz DEFAULT now(), node text)")
        cluster = LeasedCluster(lab, lease, FENCING)
        tl = Timeline(lab, interval=0.1, writer_interval=WRITER_INTERVAL, role_interval=0.25)
        try:
            with ProcWatch(f"{lab.workdir}/") as procs, tl:
                _wait(lab, "client writes through the VIP", lambda: any(w["ok"] for w in tl.writes))
                time.sleep(SETTLE)
                t0 = time.time()
                tl.action(f"freeze {old.name} (SIGSTOP of every process)")
                lab.freeze(old)
                try:
                    _wait(lab, "VIP gone from the frozen node", lambda: VIP not in
                          lab.addresses(old), lease + 10)
                    gone = time.time() - t0
                    _wait(lab, "a standby promoted", lambda: _promoted(lab, old))
                    new = _promoted(lab, old)
                    assert new is not None
                    _wait(lab, f"VIP on {new.name}", lambda: lab.vip_holders() == [new.name])
                    on_new = time.time() - t0
                    _wait(lab, "client writes again", lambda: tl.outage_after(t0) is not None)
                finally:
                    lab.thaw(old)
                time.sleep(SETTLE)
        finally:
            cluster.stop()
        entries = entries_after(new, t0)
        hooks = procs.find(f"{new.dir}/", "promote", after=t0 - 0.02)
        running = seconds_of(promote_decided(entries))  # repmgr standby promote starts
        added = vip_added(entries)
        ready = first(read_log(new.pg_log, PG_LINE), r"ready to accept connections",
                      running if running else t0)
        outage = tl.outage_after(t0)
        if not hooks or running is None or ready is None or outage is None:
            raise ScenarioError("no promote hook seen, no promote verdict in the journal, no "
                                "PostgreSQL ready line or no outage")
        began = hooks[0].start
        result: dict[str, Any] = {
            "nodes": nodes, "lease_s": lease, "new": new.name,
            "vip_gone_s": gone,
            "detection_s": began - t0,
            "vip_wait_s": running - began,
            "promote_s": ready.t - running,
            "repmgr_s": (began - t0) + (ready.t - running),
            "outage_s": outage[1] - outage[0],
            "vip_on_new_s": on_new,
            "vip_added_by": str(added.get("source")) if added else "nobody",
            "client_ok_again_s": outage[1] - t0,
            "max_vip_holders": tl.max_holders,
        }
        result["added_s"] = result["client_ok_again_s"] - result["repmgr_s"]
    say(f"  frozen primary, lease {lease} s, {nodes} nodes: VIP gone after "
        f"{result['vip_gone_s']:.2f} s; repmgr {result['repmgr_s']:.2f} s (detection "
        f"{result['detection_s']:.2f} + promote {result['promote_s']:.2f}); VIP wait "
        f"{result['vip_wait_s']:.2f} s; VIP on {new.name} after {on_new:.2f} s (added by the "
        f"{result['vip_added_by']}); client back after {result['client_ok_again_s']:.2f} s "
        f"(+{result['added_s']:.2f} s over repmgr); max holders {result['max_vip_holders']}")
    return result


def frozen_table(results: list[dict[str, Any]]) -> str:
    """Markdown rows: one per frozen-primary run."""
    rows = ["| frozen primary | VIP gone | repmgr (detection + promote) | VIP wait before "
            "promote | client back | over repmgr | max holders |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| lease {r['lease_s']} s, {r['nodes']} nodes | {r['vip_gone_s']:.2f} s | "
             f"{r['repmgr_s']:.2f} s ({r['detection_s']:.2f} + {r['promote_s']:.2f}) | "
             f"{r['vip_wait_s']:.2f} s | {r['client_ok_again_s']:.2f} s | "
             f"+{r['added_s']:.2f} s | {r['max_vip_holders']} |" for r in results]
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    leases = [int(a) for a in argv] or [4]
    results = [frozen_failover(3, lease, lambda text: print(text, flush=True))
               for lease in leases]
    print(frozen_table(results))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
