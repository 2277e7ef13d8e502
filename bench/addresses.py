"""The other addresses: a dual-stack VIP (IPv4 + IPv6) and the read-only replica VIP.

`python -m bench.addresses` alone, or `BENCH_PARTS=addresses python -m bench`; the full bench
runs it too. Each repetition builds one 3-node lab with the generated hooks, repmgrd and
`repmgr-vip daemon` on every node as the systemd unit runs it (direct mode), `[vip] address =
[IPv4, IPv6]` (as tests/integration/test_ipv6.py) and `[replica_vip]` (as
tests/integration/test_replica_vip.py, max_lag_bytes 1 MiB; node3 has priority 0, so node2 is
promoted). In that lab, in order:

1. the replica VIP's holder (node2) has its PostgreSQL stopped (`pg_ctl stop -m fast`):
   seconds from the stop's return until the next standby alone holds it;
2. replay is paused on the new holder (node3) and the primary writes 20 000 rows of 200
   bytes: seconds from the end of the writes until another standby alone holds it;
3. `kill -9` of the primary's postmaster: from the promoted server's "ready to accept
   connections" (PostgreSQL's log) to the VIP step's "held" entry in the new primary's
   decision journal (written once the addresses are added and announced), to both addresses
   held by it (sampler), and to the client's IPv6 neighbour entry showing
   its MAC (the client sends nothing meanwhile: only the unsolicited advertisement can change
   it); and when the replica VIP is on the remaining standby.

A 50 ms sampler on each address (IPv4, IPv6, replica) runs throughout: the most holders seen
(its largest gap between two samples and its errors are kept in the JSON: a loaded machine
stretches them, and a gap is where a double holder could hide).
Environment: BENCH_RUNS=N repetitions (default 3; quick: 1).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.hooklog import PG_LINE, first, read_log
from bench.journalread import added_at, entries_after, vip_added
from bench.report import cell
from lab import VIP, VIP6, VIP6_IP, VIP_IP, Lab, Node, VipSampler
from tests.integration.vipconf import (
    install_generated_sudoers,
    start_daemon,
    stop_daemon,
    wire_hooks,
    write_vip_config,
)

REPLICA = "192.0.2.116/24"  # as tests/integration/test_replica_vip.py
REPLICA_IP = "192.0.2.116"
MAX_LAG = 1048576
NODES = 3
WAIT = 60.0
RESULTS = Path(__file__).parent / "results"

Say = Callable[[str], None]


class AddressError(RuntimeError):
    """A repetition did not go as it should; its figures are unusable."""


def _wait(lab: Lab, what: str, predicate: Callable[[], object], timeout: float = WAIT) -> float:
    """Seconds until predicate holds (TimeoutError naming `what`)."""
    started = time.monotonic()
    lab.wait_for(lambda: bool(predicate()), timeout, interval=0.02, what=what)
    return time.monotonic() - started


class NeighWatch:
    """The client's neighbour entry for the IPv6 VIP every ~20 ms: (epoch time, MAC)."""

    def __init__(self, lab: Lab, ip: str = VIP6_IP, interval: float = 0.02) -> None:
        self.lab, self.ip, self.interval = lab, ip, interval
        self.seen: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="neigh")

    def __enter__(self) -> NeighWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                mac = self.lab.client_neigh_mac(self.ip)
            except Exception:  # a failed look is not an answer
                mac = None
            self.seen.append((time.time(), mac))
            self._stop.wait(self.interval)

    def first(self, mac: str, after: float) -> float | None:
        return next((t for t, m in self.seen if t >= after and m == mac), None)


def _epoch(sampler: VipSampler, offset: float, predicate: Callable[[tuple[str, ...]], bool],
           after: float) -> float | None:
    """The first sample (epoch seconds) at or after `after` that satisfies predicate."""
    return next((t + offset for t, h in list(sampler.samples)
                 if t + offset >= after and predicate(h)), None)


def _primary(lab: Lab, old: Node | None = None) -> Node | None:
    return next((n for n in lab.nodes if n is not old and lab.is_in_recovery(n) is False), None)


def _client_sees_primary(lab: Lab, host: str) -> bool:
    result = lab.client_psql("SELECT pg_is_in_recovery()", host=host, check=False, timeout=5)
    return result.returncode == 0 and result.stdout.strip() == "f"


def _setup(lab: Lab) -> dict[str, Any]:
    """Dual-stack VIP and replica VIP configs, generated sudoers and hooks, repmgrd, daemons."""
    node1, _, node3 = lab.nodes
    lab.set_repmgr_conf(node3, "priority", "0", quote=False)
    extra = f'[replica_vip]\naddress = "{REPLICA}"\nmax_lag_bytes = {MAX_LAG}\n'
    for node in lab.nodes:
        write_vip_config(lab, node, extra, address=f'["{VIP}", "{VIP6}"]')
    install_generated_sudoers(lab, node1)
    for node in lab.nodes:
        wire_hooks(lab, node)
    lab.psql(node1, "UPDATE repmgr.nodes SET priority = 0 WHERE node_name = 'node3'")
    for node in lab.nodes:
        result = lab.repmgr(node, "daemon", "start", check=False, timeout=60)
        if result.returncode != 0:
            raise AddressError(f"repmgrd did not start on {node.name}: {result.stderr[-300:]}")
    return {n.name: start_daemon(lab, n) for n in lab.nodes}


def repetition(rep: int, say: Say) -> dict[str, Any]:
    """One lab, the three faults above; the figures in seconds."""
    with Lab(nodes=NODES) as lab:
        node1, node2, node3 = lab.nodes
        offset = time.time() - time.monotonic()
        daemons = _setup(lab)
        out: dict[str, Any] = {"rep": rep, "nodes": NODES}
        try:
            with VipSampler(lab, ip=VIP_IP) as v4, VipSampler(lab, ip=VIP6_IP) as v6, \
                    VipSampler(lab, ip=REPLICA_IP) as rv:
                _wait(lab, "both addresses on node1 and the replica VIP on node2", lambda:
                      lab.vip_holders(VIP_IP) == ["node1"]
                      and lab.vip_holders(VIP6_IP) == ["node1"]
                      and lab.vip_holders(REPLICA_IP) == ["node2"])
                _wait(lab, "client reaches the primary over IPv6",
                      lambda: _client_sees_primary(lab, VIP6_IP), 20)

                # 1. the holder's PostgreSQL stops
                lab.stop_postgres(node2)
                stopped = time.time()
                _wait(lab, "replica VIP on node3", lambda: lab.vip_holders(REPLICA_IP)
                      == ["node3"])
                moved = _epoch(rv, offset, lambda h: h == ("node3",), stopped)
                out["replica_stop_s"] = (moved or time.time()) - stopped
                lab.start_postgres(node2)
                _wait(lab, "node2 streams again", lambda: lab.streaming_count(node1) == 2)

                # 2. the holder lags: replay paused, the primary writes
                lab.psql(node3, "SELECT pg_wal_replay_pause()", dbname="postgres")
                lab.psql(node1, "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad "
                         "FROM generate_series(1, 20000) g", dbname="postgres")
                written = time.time()
                _wait(lab, "replica VIP leaves the lagging node3",
                      lambda: lab.vip_holders(REPLICA_IP) == ["node2"])
                moved = _epoch(rv, offset, lambda h: h == ("node2",), written)
                out["replica_lag_s"] = (moved or time.time()) - written
                lab.psql(node3, "SELECT pg_wal_replay_resume()", dbname="postgres")
                _wait(lab, "node3 replays again", lambda: lab.psql(
                    node3, "SELECT NOT pg_is_wal_replay_paused()", dbname="postgres") == "t")

                # 3. kill -9 of the primary: both addresses and the client's IPv6 entry
                _wait(lab, "client's IPv6 neighbour entry shows node1",
                      lambda: lab.client_neigh_mac(VIP6_IP) == node1.mac, 10)
                with NeighWatch(lab) as neigh:
                    killed = time.time()
                    lab.kill_postgres(node1)
                    _wait(lab, "a standby promoted", lambda: _primary(lab, node1))
                    new = _primary(lab, node1)
                    if new is None:
                        raise AddressError("no standby was promoted")
                    _wait(lab, f"both addresses on {new.name}", lambda:
                          lab.vip_holders(VIP_IP) == [new.name]
                          and lab.vip_holders(VIP6_IP) == [new.name])
                    _wait(lab, "client's IPv6 neighbour entry follows",
                          lambda: neigh.first(new.mac, killed) is not None, 10)
                others = [n for n in (node2, node3) if n is not new]
                _wait(lab, "replica VIP on the remaining standby",
                      lambda: lab.vip_holders(REPLICA_IP) == [others[0].name])
                _wait(lab, f"client reaches {new.name} via both addresses", lambda:
                      _client_sees_primary(lab, VIP_IP) and _client_sees_primary(lab, VIP6_IP),
                      20)
                time.sleep(1.0)
        finally:
            for proc in daemons.values():
                if proc.poll() is None:
                    stop_daemon(proc)
        errors = sum(len(s.errors) for s in (v4, v6, rv))
        gap = max((max(s.periods(), default=0.0) for s in (v4, v6, rv)), default=0.0)
        ready = first(read_log(new.pg_log, PG_LINE), r"ready to accept connections", killed)
        if ready is None:
            raise AddressError(f"no 'ready to accept connections' line on {new.name}")
        entry = vip_added(entries_after(new, killed))
        added = added_at(entry) if entry is not None else None
        t4 = _epoch(v4, offset, lambda h: h == (new.name,), killed)
        t6 = _epoch(v6, offset, lambda h: h == (new.name,), killed)
        replica = _epoch(rv, offset, lambda h: h == (others[0].name,), killed)
        mac = neigh.first(new.mac, killed)
        if t4 is None or t6 is None or mac is None or replica is None:
            raise AddressError("an instant is missing (sampler or neighbour entry)")
        both = max(t4, t6)
        out.update({
            "new": new.name,
            "promoted_after_kill_s": ready.t - killed,
            "added_after_promoted_s": None if added is None else added - ready.t,
            "both_after_promoted_s": both - ready.t,
            "ipv6_minus_ipv4_s": t6 - t4,
            "neigh_after_promoted_s": mac - ready.t,
            "both_after_kill_s": both - killed,
            "replica_after_promoted_s": replica - ready.t,
            "max_holders": {"ipv4": v4.max_holders, "ipv6": v6.max_holders,
                            "replica": rv.max_holders},
            "sampler_errors": errors, "sampler_max_gap_s": round(gap, 3),
        })
    say(f"  addresses run {rep}: replica VIP moved {out['replica_stop_s']:.2f} s after its "
        f"holder's PostgreSQL stopped, {out['replica_lag_s']:.2f} s after it lagged; kill -9: "
        f"{new.name} promoted {out['promoted_after_kill_s']:.2f} s after the kill, both "
        f"addresses {out['both_after_promoted_s']:.2f} s and the client's IPv6 entry "
        f"{out['neigh_after_promoted_s']:.2f} s after the promotion; replica VIP on the "
        f"remaining standby {out['replica_after_promoted_s']:.2f} s after it; most holders "
        f"{out['max_holders']}")
    return out


ROWS = (
    ("**Dual-stack VIP, `kill -9` of the primary's postmaster, daemons up**", "", "s"),
    ("fault → PostgreSQL promoted (its log: ready to accept connections)",
     "promoted_after_kill_s", "s"),
    ("promoted → the VIP step's \"held\" entry in the new primary's decision journal "
     "(written once added and announced)", "added_after_promoted_s", "s"),
    ("promoted → both addresses held by the new primary (sampler)", "both_after_promoted_s", "s"),
    ("IPv6 address held minus IPv4 address held", "ipv6_minus_ipv4_s", "s"),
    ("promoted → client's IPv6 neighbour entry shows the new MAC (client silent)",
     "neigh_after_promoted_s", "s"),
    ("**Replica VIP (`max_lag_bytes` 1 MiB): moved to another standby after...**", "", "s"),
    ("its holder's PostgreSQL stopped", "replica_stop_s", "s"),
    ("its holder lagged (replay paused, the primary wrote 20 000 rows of 200 bytes)",
     "replica_lag_s", "s"),
    ("its holder was promoted (from the promotion; includes repmgr's follow)",
     "replica_after_promoted_s", "s"),
)


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: median (min-max) over the runs, and the most holders of each address."""
    lines = [f"| figure ({NODES} nodes, n={len(runs)}) | median (min\u2013max) |", "|---|---|"]
    for label, key, unit in ROWS:
        if not key:
            lines.append(f"| {label} | |")
            continue
        vals = [float(r[key]) for r in runs if isinstance(r.get(key), int | float)]
        lines.append(f"| {label} | {cell(vals, unit)} |")
    for address in ("ipv4", "ipv6", "replica"):
        most = max((r["max_holders"][address] for r in runs), default=0)
        lines.append(f"| most nodes holding the {address} address at once (sampler) | {most} |")
    return "\n".join(lines)


def runs_default() -> int:
    return int(os.environ.get("BENCH_RUNS", "3"))


def measure(say: Say, runs: int | None = None) -> tuple[list[dict[str, Any]],
                                                         list[dict[str, Any]]]:
    """The repetitions that worked and the ones that failed (with why)."""
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for rep in range(1, (runs or runs_default()) + 1):
        try:
            done.append(repetition(rep, say))
        except Exception as exc:  # one bad run must not lose the others' figures
            say(f"    addresses run {rep} failed: {exc!r}"[:2000])
            failed.append({"part": "addresses", "rep": rep, "error": repr(exc)[:4000]})
    return done, failed


def main() -> int:
    from bench.__main__ import machine, measured_version  # not at import: __main__ imports us

    say: Say = lambda text: print(text, flush=True)  # noqa: E731
    meta = machine()
    meta["measured_version"] = measured_version()
    started = time.monotonic()
    done, failed = measure(say)
    text = table(done) if done else "no run worked"
    header = (f"Measured {meta['date']} on {meta['nproc']} CPUs, kernel {meta['kernel']}, "
              f"{meta['repmgr_vip']} ({meta['measured_version']}); load average at start "
              f"{meta['loadavg_start'][0]:.2f}, at the end {os.getloadavg()[0]:.2f}, other "
              f"labs running at start: {len(meta['other_labs_at_start'])}; took "
              f"{time.monotonic() - started:.0f} s.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "addresses.json").write_text(json.dumps(
        {"meta": meta, "runs": done, "failed": failed, "header": header,
         "table_markdown": text}, indent=2, default=str) + "\n")
    say(f"\n{header}\n")
    say(text)
    if done:
        say("\nmedians: " + ", ".join(
            f"{k} {statistics.median(float(r[k]) for r in done):.2f}"
            for _, k, _ in ROWS if k and all(isinstance(r.get(k), int | float) for r in done)))
    return 0 if done and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
