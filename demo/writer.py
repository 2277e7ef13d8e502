"""A client that writes through the VIP every few milliseconds and reports each attempt.

Runs inside the lab's client namespace; prints one JSON line per attempt so the demo and the
benchmark can tell exactly when writes failed and when they came back, and on which node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    import psycopg

    conn: Any = None
    end = time.time() + args.seconds
    while time.time() < end:
        started = time.time()
        try:
            if conn is None:
                conn = psycopg.connect(host=args.host, dbname="repmgr", user="repmgr",
                                       connect_timeout=1, tcp_user_timeout=1000,
                                       # a frozen server's kernel still ACKs: only a probe
                                       # that reaches the VIP's new holder (RST) ends the wait
                                       keepalives=1, keepalives_idle=1, keepalives_interval=1,
                                       keepalives_count=2, autocommit=True)
            row = conn.execute("INSERT INTO demo_writes(node) "
                               "VALUES (current_setting('cluster_name')) RETURNING node").fetchone()
            # a success counts from when it completed: the attempt may have waited for the VIP
            record = {"t": time.time(), "ok": True, "server": row[0]}
        except Exception as exc:
            record = {"t": started, "ok": False, "error": str(exc).strip()[:120]}
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = None
        print(json.dumps(record), flush=True)
        time.sleep(max(0.0, args.interval - (time.time() - started)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
