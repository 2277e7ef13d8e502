"""The ideal mover: the baseline repmgr-vip is measured against (run as root in the client
namespace by bench/ideal.py).

It is what a VIP manager with no safety work at all could do at best: one kept connection per
node, `SELECT pg_is_in_recovery()` every 15 ms on each (one thread per node, so a dead host
never delays the others), and the instant a node other than the holder answers "not in
recovery", `ip address del` on the old holder, `ip address add` on the new one and an
unsolicited ARP from it. No fencing, no proof. Prints one JSON line per event.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from typing import Any

POLL = 0.015
# a dead link must end a query in about a second, not after TCP's retransmissions
KEEP = ("connect_timeout=1 tcp_user_timeout=1000 keepalives=1 keepalives_idle=1 "
        "keepalives_interval=1 keepalives_count=1")


def say(**record: Any) -> None:
    print(json.dumps({"t": time.time(), **record}), flush=True)


class Mover:
    def __init__(self, nodes: dict[str, tuple[str, str]], holder: str, vip: str,
                 interface: str, ip: str, arping: str) -> None:
        self.nodes = nodes  # name -> (netns, conninfo)
        self.holder = holder
        self.vip, self.interface, self.ip, self.arping = vip, interface, ip, arping
        self.lock = threading.Lock()
        self.announcers: list[subprocess.Popen[bytes]] = []

    def watch(self, name: str) -> None:
        import psycopg

        conninfo = f"{self.nodes[name][1]} {KEEP}"
        conn: Any = None
        while True:
            started = time.monotonic()
            try:
                if conn is None:
                    conn = psycopg.connect(conninfo, autocommit=True)
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and row[0] is False:
                    self.promoted(name)
            except Exception:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                time.sleep(0.2)  # backoff: a down node is retried five times a second
            time.sleep(max(0.0, POLL - (time.monotonic() - started)))

    def promoted(self, name: str) -> None:
        with self.lock:
            if name == self.holder:
                return
            old, self.holder = self.holder, name
            say(event="promotion_seen", node=name, old=old)
            self._ip(old, "del")
            self._ip(name, "add")
            self.announcers.append(subprocess.Popen(
                ["ip", "netns", "exec", self.nodes[name][0], self.arping, "-U", "-c", "3",
                 "-I", self.interface, self.ip],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            say(event="moved", node=name, old=old)

    def _ip(self, name: str, verb: str) -> None:
        subprocess.run(["ip", "-n", self.nodes[name][0], "address", verb, self.vip, "dev",
                        self.interface], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", action="append", default=[],
                        help="NAME=NETNS=CONNINFO, one per node")
    parser.add_argument("--holder", required=True, help="the node holding the VIP now")
    parser.add_argument("--vip", required=True, help="address/prefix")
    parser.add_argument("--interface", default="eth0")
    parser.add_argument("--arping", default="/usr/bin/arping")
    args = parser.parse_args()
    nodes = {}
    for spec in args.node:
        name, netns, conninfo = spec.split("=", 2)
        nodes[name] = (netns, conninfo)
    mover = Mover(nodes, args.holder, args.vip, args.interface, args.vip.split("/")[0],
                  args.arping)
    for name in nodes:
        threading.Thread(target=mover.watch, args=(name,), daemon=True).start()
    say(event="start", holder=args.holder)
    while True:
        time.sleep(1.0)
        for proc in list(mover.announcers):
            if proc.poll() is not None:
                mover.announcers.remove(proc)


if __name__ == "__main__":
    sys.exit(main())
