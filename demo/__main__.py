"""The lab demo (README's run command): failover and switchover with a VIP, as a timeline.

Builds a 3-node repmgr cluster in network namespaces, starts repmgrd through repmgr-vip's
start hook, writes through the VIP from a client, kills the primary's PostgreSQL, lets
repmgrd fail over, rejoins the old primary and switches back. Exits 0 only if the VIP ended
on exactly the right node and was never on two nodes at once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from demo.plot import write_png
from demo.timeline import Timeline
from lab import Lab
from repmgr_vip.adapters import journal
from tests.integration.vipconf import hooked_cluster

PICTURE = Path("/tmp/repmgr-vip-demo.png")


def _wait(lab: Lab, what: str, predicate: object, timeout: float = 60.0) -> None:
    lab.wait_for(predicate, timeout, interval=0.05, what=what)  # type: ignore[arg-type]


def _span(a: float | None, b: float | None) -> str:
    return f"{b - a:6.2f} s" if a is not None and b is not None else "   n/a"


def run() -> int:
    print("building a 3-node PostgreSQL 15 + repmgr 5.3 lab in network namespaces ...",
          flush=True)
    with Lab(nodes=3) as lab:
        lab.up()
        lab.psql(lab.nodes[0], "CREATE TABLE demo_writes(id bigserial PRIMARY KEY, "
                 "at timestamptz DEFAULT now(), node text)")
        node1, node2, _ = lab.nodes
        print(f"lab {lab.prefix}: " + ", ".join(f"{n.name}={n.ip} ({n.mac})" for n in lab.nodes)
              + ", VIP 192.0.2.115/24", flush=True)
        timeline = Timeline(lab)
        with timeline:
            timeline.action("repmgr daemon start on every node (repmgr-vip start-repmgrd)")
            hooked_cluster(lab)
            _wait(lab, "client writes through the VIP", lambda: any(
                w["ok"] for w in timeline.writes))
            time.sleep(1.0)

            killed = time.time()
            timeline.action("kill -9 the postmaster of node1 (the primary)")
            lab.kill_postgres(node1)
            _wait(lab, "node2 promoted and holding the VIP",
                  lambda: lab.vip_holders() == ["node2"] and lab.is_in_recovery(node2) is False)
            _wait(lab, "client writes again", lambda: timeline.outage_after(killed) is not None)
            time.sleep(1.0)

            _wait(lab, "repmgr metadata names node2 primary", lambda: lab.psql(
                node2, "SELECT node_name FROM repmgr.nodes WHERE type = 'primary' AND active")
                == "node2")
            # pg_rewind reads the new primary's timeline from its control file: the promote
            # hook's own CHECKPOINT (after the VIP is up) writes it
            _wait(lab, "the promote hook's CHECKPOINT", lambda: any(
                e.get("action") == "checkpoint" for e in journal.read(node2.dir)))
            timeline.action("repmgr node rejoin node1 as a standby of node2 (--force-rewind)")
            lab.repmgr(node1, "node", "rejoin", "-d", node2.conninfo, "--force-rewind",
                       timeout=120)
            _wait(lab, "node1 in recovery", lambda: lab.is_in_recovery(node1) is True)
            time.sleep(1.0)

            switched = time.time()
            timeline.action("repmgr standby switchover on node1 --siblings-follow")
            lab.repmgr(node1, "standby", "switchover", "--siblings-follow", timeout=180)
            switch_done = time.time()
            timeline.action("switchover command returned")
            _wait(lab, "VIP back on node1", lambda: lab.vip_holders() == ["node1"])
            _wait(lab, "client writes after switchover",
                  lambda: timeline.outage_after(switched) is not None
                  or (timeline.writes and bool(timeline.writes[-1]["ok"])
                      and float(str(timeline.writes[-1]["t"])) > switch_done))
            time.sleep(1.0)
            final_holders = lab.vip_holders()

        print()
        print(timeline.render())
        promoted = timeline.first("role", "node2 is primary", killed)
        vip_moved = timeline.first("vip", "VIP on node2", killed)
        outage = timeline.outage_after(killed)
        sw_outage = timeline.outage_after(switched)
        print()
        print("failover:   PostgreSQL killed -> node2 primary   " + _span(killed, promoted))
        print("            node2 primary -> VIP on node2        " + _span(promoted, vip_moved))
        if outage:
            print("            client write outage              "
                  + _span(outage[0], outage[1]))
        print("switchover: command duration                      " + _span(switched, switch_done))
        if sw_outage:
            print("            client write outage              "
                  + _span(sw_outage[0], sw_outage[1]))
        ok = final_holders == ["node1"] and timeline.max_holders <= 1
        print()
        print(f"VIP samples: {len(timeline.vip_samples)}, most holders at once: "
              f"{timeline.max_holders}; VIP ends on {final_holders}")
        print(write_png(timeline, PICTURE, x_label="seconds since the demo started",
                        title="repmgr-vip demo: failover (node1 killed) and switchover back "
                        "to node1, 3-node lab"))
        print("RESULT: " + ("PASS: the VIP followed the primary and was never on two nodes"
                            if ok else "FAIL"))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run())
