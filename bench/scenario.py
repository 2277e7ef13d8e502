"""One repetition of the benchmark in a fresh lab, and the figures taken from it.

Order in one lab: failover with the old primary's host alive (its postmaster killed), rejoin
of the old primary, planned switchover back to it, failover with the old primary's host cut
off the network (link down: SSH unreachable). Each failover is timed from the hook's own log
lines, the kernel's start time of the hook process, the first ARP frame from the new holder
seen in the client namespace, and the client writer's attempts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.hooklog import PG_LINE, LogLine, fencing_seconds, first, read_log
from bench.procwatch import Proc, ProcWatch
from bench.sessions import new_sessions
from bench.sshwarm import measure as measure_links
from demo.timeline import Timeline
from lab import CLIENT_IP, INTERFACE, VIP_IP, Lab, Node
from tests.integration import vipconf
from tests.integration.vipconf import REPMGR_VIP, config_path, hooked_cluster

HERE = Path(__file__).parent
ARPWATCH = HERE / "arpwatch.py"
STARTUP = HERE / "startup.py"
WAIT = 120.0
SETTLE = 1.0
ARP_INTERVAL = 0.005
WRITER_INTERVAL = 0.02
ROLE_INTERVAL = 0.25
SESSIONS_BASELINE = 30.0

Say = Callable[[str], None]


class ScenarioError(RuntimeError):
    """A repetition did not go as a failover or switchover should; its figures are unusable."""


@dataclass
class ArpWatch:
    """arpwatch.py in the client namespace; `frames` holds (time, MAC or None) changes."""

    lab: Lab
    frames: list[tuple[float, str | None]] = field(default_factory=list)
    _proc: subprocess.Popen[str] | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> ArpWatch:
        argv = [sys.executable, str(ARPWATCH), "--interface", INTERFACE, "--ip", VIP_IP,
                "--src-ip", CLIENT_IP, "--interval", str(ARP_INTERVAL)]
        self._proc = self.lab.popen(None, argv, user="root", stderr=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            record = json.loads(line)
            if "mac" in record:
                self.frames.append((float(record["t"]), record["mac"]))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def first_from(self, mac: str, after: float) -> float | None:
        return next((t for t, m in self.frames if t >= after and m == mac), None)


def _wait(lab: Lab, what: str, predicate: Callable[[], object], timeout: float = WAIT) -> None:
    lab.wait_for(lambda: bool(predicate()), timeout, interval=0.05, what=what)


def _union_seconds(spans: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def measure_startup(lab: Lab, node: Node, runs: int = 10) -> dict[str, Any]:
    """startup.py as postgres inside a node: the cost of a bare hook process on this machine."""
    result = lab.run(node, [sys.executable, str(STARTUP), "--command", REPMGR_VIP,
                            "--runs", str(runs)], timeout=120)
    return dict(json.loads(result.stdout))


def _hook_lines(node: Node, after: float) -> dict[str, LogLine]:
    lines = read_log(node.dir / "repmgr-vip.log")
    found = {
        "fencing": first(lines, r"^promote: fencing: ", after),
        "running": first(lines, r"^running \S+/repmgr .* standby promote", after),
        "exited": first(lines, r"^standby promote exited 0$", after),
        "added": first(lines, r"^promote: VIP \S+ added and announced", after),
    }
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise ScenarioError(f"{node.name}: no promote log line(s) {missing} after the fault")
    return {k: v for k, v in found.items() if v is not None}


def failover(lab: Lab, tl: Timeline, arp: ArpWatch, procs: ProcWatch, *, cut: bool,
             say: Say) -> dict[str, Any]:
    """Fault the primary; time repmgrd, the promote hook, the VIP and the client."""
    old = lab.primary()
    if old is None:
        raise ScenarioError("no primary before the failover")
    fault = "cut the link of" if cut else "kill -9 the postmaster of"
    t0 = time.time()
    tl.action(f"{fault} {old.name} (the primary)")
    if cut:
        lab.link_down(old)
    else:
        lab.kill_postgres(old)
    found: list[Node] = []

    def promoted() -> bool:
        # cheap first: the ARP watcher's latest answer, in memory; psql and ip only after it
        latest = arp.frames[-1] if arp.frames else (0.0, None)
        node = lab.node_by_mac(latest[1]) if latest[0] >= t0 and latest[1] else None
        if (node is not None and node is not old and lab.is_in_recovery(node) is False
                and lab.vip_holders() == [node.name]):
            found.append(node)
            return True
        return False

    _wait(lab, "another node promoted and answering for the VIP", promoted)
    new = found[-1]
    _wait(lab, "client writes through the VIP again", lambda: tl.outage_after(t0) is not None)
    _wait(lab, f"{new.name}'s promote hook to finish",
          lambda: first(read_log(new.dir / "repmgr-vip.log"), r"^promote: VIP .* added", t0))
    time.sleep(SETTLE)
    lines = _hook_lines(new, t0)
    node_dir = f"{new.dir}/"
    hooks = procs.find(node_dir, "promote", after=t0 - 0.02)
    if not hooks:
        raise ScenarioError(f"{new.name}: the promote hook process was not seen in /proc")
    hook: Proc = hooks[0]
    running, exited = lines["running"].t, lines["exited"].t
    inside = [(max(p.start, running), min(p.last_seen, exited))
              for p in procs.find(node_dir, "event", after=running) if p.start <= exited]
    event_s = _union_seconds([s for s in inside if s[1] > s[0]])
    fencing_s = fencing_seconds(lines["fencing"])
    if fencing_s is None:
        raise ScenarioError(f"{new.name}: fencing line without a duration")
    arp_new = arp.first_from(new.mac, running)
    outage = tl.outage_after(t0)
    ready = first(read_log(new.pg_log, PG_LINE), r"ready to accept connections", running)
    if arp_new is None or outage is None or ready is None:
        raise ScenarioError("no ARP answer from the new primary, no client outage seen, or "
                            "no 'ready to accept connections' in its PostgreSQL log")
    detection = hook.start - t0
    promote_s = exited - running
    # repmgr's part: detection and election, then pg_promote until the server accepts writes;
    # our event hook runs after that, inside repmgr's own wait, and delays no client
    repmgr_own = detection + (ready.t - running)
    handover = arp_new - ready.t
    fencing_began = lines["fencing"].t - fencing_s
    result = {
        "old": old.name, "new": new.name, "fault": "link down" if cut else "postmaster killed",
        "t0": t0,
        "at": {  # seconds after the fault, for the picture and for checking by hand
            "hook_started": hook.start - t0,
            "fencing_began": fencing_began - t0,
            "promote_running": running - t0,
            "postgres_promoted": ready.t - t0,
            "promote_exited": exited - t0,
            "vip_added_logged": lines["added"].t - t0,
            "arp_new_mac": arp_new - t0,
            "client_first_fail": outage[0] - t0,
            "client_ok_again": outage[1] - t0,
        },
        "fencing_summary": lines["fencing"].message,
        "detection_s": detection,
        "hook_startup_s": fencing_began - hook.start,
        "fencing_s": fencing_s,
        "pre_promote_s": running - hook.start,
        "promote_s": promote_s,
        "event_hooks_in_promote_s": event_s,
        "handover_s": handover,
        "after_repmgr_s": arp_new - exited,
        "client_reconnect_s": outage[1] - arp_new,
        "vip_step_s": (running - hook.start) + handover,
        "repmgr_s": repmgr_own,
        "outage_s": outage[1] - outage[0],
        "added_s": (outage[1] - outage[0]) - repmgr_own,
    }
    say(f"    {result['fault']}: {old.name} -> {new.name}: outage {result['outage_s']:.2f} s, "
        f"repmgr {repmgr_own:.2f} s, handover {handover * 1000:.0f} ms, "
        f"fencing {fencing_s:.2f} s, hook start-up {(fencing_began - hook.start) * 1000:.0f} ms")
    return result


def rejoin(lab: Lab, tl: Timeline, old: Node, new: Node, say: Say) -> None:
    """The old primary back as a standby of the new one, as the demo does it."""
    lab.psql(new, "CHECKPOINT")  # pg_rewind reads the new timeline from the control file
    tl.action(f"repmgr node rejoin {old.name} (--force-rewind)")
    lab.repmgr(old, "node", "rejoin", "-d", new.conninfo, "--force-rewind", timeout=180)
    _wait(lab, f"{old.name} in recovery", lambda: lab.is_in_recovery(old) is True)
    want = len(lab.nodes) - 1
    _wait(lab, f"{want} standbys streaming from {new.name}",
          lambda: lab.streaming_count(new) >= want)
    say(f"    rejoined {old.name}")


def switchover(lab: Lab, tl: Timeline, target: Node, say: Say) -> dict[str, Any]:
    """repmgr standby switchover --siblings-follow on `target`: its duration and the outage."""
    t0 = time.time()
    tl.action(f"repmgr standby switchover on {target.name} --siblings-follow")
    lab.repmgr(target, "standby", "switchover", "--siblings-follow", timeout=300)
    done = time.time()
    tl.action("switchover command returned")

    def writes_ok_after_done() -> bool:
        return any(w["ok"] and float(str(w["t"])) > done for w in tl.writes)

    _wait(lab, f"VIP on {target.name}", lambda: lab.vip_holders() == [target.name])
    _wait(lab, "client writes after the switchover", writes_ok_after_done)
    want = len(lab.nodes) - 1
    _wait(lab, f"{want} standbys streaming from {target.name}",
          lambda: lab.streaming_count(target) >= want)
    time.sleep(SETTLE)
    outage = tl.outage_after(t0)
    outage_s = outage[1] - outage[0] if outage else 0.0
    say(f"    switchover to {target.name}: {done - t0:.2f} s, client outage {outage_s:.2f} s")
    return {"duration_s": done - t0, "outage_s": outage_s,
            "at": {"returned": done - t0,
                   "client_first_fail": outage[0] - t0 if outage else None,
                   "client_ok_again": outage[1] - t0 if outage else None}}


def run_repetition(nodes: int, rep: int, say: Say,
                   picture: Path | None = None) -> dict[str, Any]:
    """A fresh lab, the four steps, the figures; draws the first failover if asked."""
    started = time.time()
    with Lab(nodes=nodes) as lab:
        say(f"  [{nodes} nodes, run {rep}] lab {lab.prefix} up in {lab.timings['up']:.1f} s")
        node1 = lab.nodes[0]
        lab.psql(node1, "CREATE TABLE demo_writes(id bigserial PRIMARY KEY, "
                 "at timestamptz DEFAULT now(), node text)")
        result: dict[str, Any] = {"nodes": nodes, "rep": rep, "prefix": lab.prefix}
        result["startup"] = measure_startup(lab, lab.nodes[-1])
        hooked_cluster(lab)
        _wait(lab, "VIP on node1", lambda: lab.vip_holders() == ["node1"])
        # sampling costs CPU on a small machine: keep it about constant as nodes are added
        tl = Timeline(lab, interval=max(0.1, 0.03 * nodes), writer_interval=WRITER_INTERVAL,
                      role_interval=max(ROLE_INTERVAL, 0.07 * nodes))
        with ProcWatch(f"{lab.workdir}/") as procs, ArpWatch(lab) as arp, tl:
            _wait(lab, "client writes through the VIP", lambda: any(w["ok"] for w in tl.writes))
            time.sleep(SETTLE)
            alive = failover(lab, tl, arp, procs, cut=False, say=say)
            new = lab.node(alive["new"])
            rejoin(lab, tl, node1, new, say)
            result["switchover"] = switchover(lab, tl, node1, say)
            result["failover_down"] = failover(lab, tl, arp, procs, cut=True, say=say)
        result["failover_alive"] = alive
        result["max_vip_holders"] = tl.max_holders
        if picture is not None:
            result["picture"] = draw_failover(tl, alive, picture, nodes)
            say(f"    {result['picture']}")
    result["seconds"] = time.time() - started
    return result


def draw_failover(tl: Timeline, figures: dict[str, Any], path: Path, nodes: int) -> str:
    """The first failover of a run as a PNG, with the measured instants as markers."""
    from demo.plot import write_png

    t0 = float(figures["t0"])
    at = figures["at"]
    labels = {
        "hook_started": "repmgrd starts promote_command (repmgr-vip promote)",
        "fencing_began": "fencing begins",
        "promote_running": "VIP proven free; repmgr standby promote runs",
        "postgres_promoted": f"PostgreSQL on {figures['new']} accepts writes (its log)",
        "promote_exited": "repmgr standby promote exited 0",
        "arp_new_mac": f"client sees {figures['new']}'s MAC for the VIP (ARP)",
        "client_ok_again": "client writes OK again",
    }
    markers = [(t0 + float(at[k]), text) for k, text in labels.items()]
    end = t0 + float(at["client_ok_again"]) + 2.0
    title = (f"Failover, {nodes} nodes: {figures['old']}'s PostgreSQL killed, "
             f"{figures['new']} promoted by repmgrd, VIP moved by repmgr-vip "
             f"(client outage {figures['outage_s']:.2f} s, of which repmgr "
             f"{figures['repmgr_s']:.2f} s)")
    window = (t0 - 1.5, end)
    x_label = f"seconds after kill -9 of {figures['old']}'s postmaster"
    raw = {"nodes": [n.name for n in tl.lab.nodes], "start": tl.start, "t0": t0,
           "window": window, "title": title, "x_label": x_label, "markers": markers,
           "entries": [vars(e) for e in tl.entries if window[0] <= e.t <= window[1]],
           "vip_samples": [s for s in tl.vip_samples if window[0] <= s[0] <= window[1]],
           "writes": [w for w in tl.writes if window[0] <= float(str(w["t"])) <= window[1]]}
    path.with_suffix(".json").write_text(json.dumps(raw) + "\n")  # to redraw without a lab
    return write_png(tl, path, title=title, t0=t0, window=window, markers=markers,
                     x_label=x_label)


def summarise(values: list[float]) -> dict[str, float | int]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def daemon_available() -> tuple[bool, str]:
    """`repmgr-vip daemon --help` exits 0: the daemon exists in the installed version."""
    result = subprocess.run([REPMGR_VIP, "daemon", "--help"], capture_output=True, text=True,
                            check=False, timeout=30)
    if result.returncode == 0:
        return True, ""
    return False, "daemon not available"


def _daemon_pid(lab: Lab, node: Node) -> int | None:
    """The repmgr-vip daemon's own process (not ip netns exec, runuser or a shell)."""
    marker = str(config_path(node))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if marker in words and "daemon" in words and comm not in ("ip", "runuser", "sh"):
            return int(entry.name)
    return None


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    return sum(int(v) for v in fields[11:15])  # utime stime cutime cstime


def _rss_kib(pid: int) -> tuple[int, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def _start_daemon(lab: Lab, node: Node) -> None:
    """As the systemd unit runs it (the lab helper, when this checkout has one), else plainly
    as postgres (privileges through sudo)."""
    start = getattr(vipconf, "start_daemon", None)
    if callable(start):
        start(lab, node)
    else:
        lab.popen(node, [REPMGR_VIP, "-c", str(config_path(node)), "daemon"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure_daemon(nodes: int, seconds: float, say: Say) -> dict[str, Any]:
    """`repmgr-vip daemon` on every node of a quiet cluster: RSS and CPU per hour.

    CPU counts the daemon and the helper processes it waited for (ip, arping, sudo), from
    /proc/PID/stat, over `seconds` after a warm-up; per hour is that rate times 3600.
    """
    clk = os.sysconf("SC_CLK_TCK")
    with Lab(nodes=nodes) as lab:
        hooked_cluster(lab)
        _wait(lab, "VIP on node1", lambda: lab.vip_holders() == ["node1"])
        config = subprocess.run([REPMGR_VIP, "-c", str(config_path(lab.nodes[0])), "config"],
                                capture_output=True, text=True, check=False).stdout
        try:
            period = tomllib.loads(config).get("daemon", {}).get("interval", "?")
        except tomllib.TOMLDecodeError:
            period = "?"
        time.sleep(SETTLE)
        # what repmgrd and the lab start on their own, to tell the daemons' share apart
        lab_sessions = new_sessions(lab, min(seconds, SESSIONS_BASELINE))
        for node in lab.nodes:
            _start_daemon(lab, node)
        time.sleep(5.0)  # warm-up: imports, first cycle, peer watchers
        pids = {n.name: _daemon_pid(lab, n) for n in lab.nodes}
        gone = [name for name, pid in pids.items() if pid is None]
        if gone:
            tail = read_log(lab.node(gone[0]).dir / "repmgr-vip.log")[-1:]
            return {"error": f"daemon not running on {gone}: "
                             + (tail[0].message if tail else "no log line")}
        start = {name: _cpu_ticks(pid) for name, pid in pids.items() if pid}
        began = time.monotonic()
        sessions = new_sessions(lab, seconds)
        elapsed = time.monotonic() - began
        per_node = {}
        for name, pid in pids.items():
            assert pid is not None
            cpu = (_cpu_ticks(pid) - start[name]) / clk
            rss, hwm = _rss_kib(pid)
            per_node[name] = {"cpu_s_per_hour": cpu / elapsed * 3600, "rss_mib": rss / 1024,
                              "peak_rss_mib": hwm / 1024,
                              "sessions_per_min": sessions["per_minute"][name],
                              "sessions_per_min_without": lab_sessions["per_minute"][name]}
            per_node[name]["sessions_per_min_daemons"] = (
                per_node[name]["sessions_per_min"] - per_node[name]["sessions_per_min_without"])
        holders = lab.vip_holders()
        try:  # after the quiet window: cold rounds close the daemon's masters
            links = measure_links(lab, lab.nodes[0])
        except Exception as exc:
            links = {"error": f"{exc!r}"[:300]}
    if "release" in links:
        say(f"  fencing's SSH step to {nodes - 1} peers: remote release cold "
            f"{links['release']['cold_median_s'] * 1000:.0f} ms, warm "
            f"{links['release']['warm_median_s'] * 1000:.0f} ms; ssh alone cold "
            f"{links['true']['cold_median_s'] * 1000:.0f} ms, warm "
            f"{links['true']['warm_median_s'] * 1000:.0f} ms")
    say(f"  daemon at {nodes} nodes, period {period} s, {elapsed:.0f} s: "
        + ", ".join(f"{k} {v['rss_mib']:.1f} MiB {v['cpu_s_per_hour']:.1f} CPU-s/h"
                    for k, v in per_node.items()))
    say("  new PostgreSQL sessions per minute, daemons running (without daemons): "
        + ", ".join(f"{k} {v['sessions_per_min']:.0f} ({v['sessions_per_min_without']:.0f})"
                    for k, v in per_node.items()))
    return {"period_s": period, "seconds": elapsed, "per_node": per_node,
            "vip_holders_after": holders, "links": links}
