"""One repetition of the benchmark in a fresh lab, and the figures taken from it.

In one lab, every failover kind for every mode (bench/ideal.py): the ideal mover (plain
promote_command, root moves the VIP the instant it sees the promotion), repmgr-vip's hooks
without a daemon, and the hooks with a daemon on every node; each with the old primary's host
alive (its postmaster killed) and with it cut off (link down: SSH unreachable). The old primary
rejoins after each failover. The mode order rotates with the repetition, so that a slow
moment of the machine does not always hit the same mode.

Each failover is timed from the kernel's start time of the promote_command process (repmgrd's
decision), the decision journal of the new primary (when the promote step started `repmgr
standby promote`, when the VIP was added), the promoted server's own log (when it accepted
writes), the ARP answers seen in the client namespace, a 10 ms sampler of every node's
addresses, and the client writer's attempts.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.dark import dark_from_client, dark_from_holders, proof_check
from bench.hooklog import PG_LINE, first, read_log
from bench.ideal import MODES, Modes, original_confs
from bench.journalread import added_at, entries_after, promote_started, vip_added
from bench.procwatch import ProcWatch, count_forks
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
ARP_SILENCE = 0.012  # the poller reports a silence after this long without an answer
WRITER_INTERVAL = 0.02
ROLE_INTERVAL = 0.25
SESSIONS_BASELINE = 30.0
# start-up left out of the quiet daemon's window (see measure_daemon)
DAEMON_WARMUP = float(os.environ.get("BENCH_DAEMON_WARMUP", "40"))
FAULTS = (("alive", False), ("down", True))
REJOIN_TRIES = 5
STRAGGLER_WAIT = 20.0

Say = Callable[[str], None]


class ScenarioError(RuntimeError):
    """A repetition did not go as a failover should; its figures are unusable."""


@dataclass
class ArpWatch:
    """arpwatch.py in the client namespace; `frames` holds (time, MAC or None, last answer)."""

    lab: Lab
    frames: list[tuple[float, str | None, float]] = field(default_factory=list)
    _proc: subprocess.Popen[str] | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> ArpWatch:
        argv = [sys.executable, str(ARPWATCH), "--interface", INTERFACE, "--ip", VIP_IP,
                "--src-ip", CLIENT_IP, "--interval", str(ARP_INTERVAL),
                "--silence", str(ARP_SILENCE)]
        self._proc = self.lab.popen(None, argv, user="root", stderr=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            record = json.loads(line)
            if "mac" in record:
                t = float(record["t"])
                self.frames.append((t, record["mac"], float(record.get("last", t))))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def first_from(self, mac: str, after: float) -> float | None:
        return next((t for t, m, _ in self.frames if t >= after and m == mac), None)


def _wait(lab: Lab, what: str, predicate: Callable[[], object], timeout: float = WAIT) -> None:
    lab.wait_for(lambda: bool(predicate()), timeout, interval=0.05, what=what)


def measure_startup(lab: Lab, node: Node, runs: int = 10) -> dict[str, Any]:
    """startup.py as postgres inside a node: the cost of a bare hook process on this machine."""
    result = lab.run(node, [sys.executable, str(STARTUP), "--command", REPMGR_VIP,
                            "--runs", str(runs)], timeout=120)
    return dict(json.loads(result.stdout))


def _max_holders(tl: Timeline, start: float, end: float) -> int:
    return max((len(h) for t, h in list(tl.vip_samples) if start <= t <= end), default=0)


def failover(lab: Lab, tl: Timeline, arp: ArpWatch, procs: ProcWatch, modes: Modes, *,
             cut: bool, say: Say) -> dict[str, Any]:
    """Fault the primary; time repmgrd, the promote step, the VIP and the client."""
    old = lab.primary()
    if old is None:
        raise ScenarioError("no primary before the failover")
    mode = modes.mode
    fault = "cut the link of" if cut else "kill -9 the postmaster of"
    t0 = time.time()
    tl.action(f"[{mode}] {fault} {old.name} (the primary)")
    if cut:
        lab.link_down(old)
    else:
        lab.kill_postgres(old)
    found: list[Node] = []

    def promoted() -> bool:
        # cheap first: the ARP watcher's latest answer, in memory; psql and ip only after it
        latest = arp.frames[-1] if arp.frames else (0.0, None, 0.0)
        node = lab.node_by_mac(latest[1]) if latest[0] >= t0 and latest[1] else None
        if (node is not None and node is not old and lab.is_in_recovery(node) is False
                and lab.vip_holders() == [node.name]):
            found.append(node)
            return True
        return False

    _wait(lab, "another node promoted and answering for the VIP", promoted)
    new = found[-1]
    _wait(lab, "client writes through the VIP again", lambda: tl.outage_after(t0) is not None)
    if mode != "ideal":
        _wait(lab, f"{new.name}'s journal: VIP added",
              lambda: vip_added(entries_after(new, t0)) is not None)
    time.sleep(SETTLE)
    window_end = time.time()
    node_dir = f"{new.dir}/"
    hooks = procs.find(node_dir, "promote", after=t0 - 0.02)
    if not hooks:
        raise ScenarioError(f"{new.name}: the promote_command process was not seen in /proc")
    hook_start = hooks[0].start
    ready = first(read_log(new.pg_log, PG_LINE), r"ready to accept connections", hook_start)
    arp_new = arp.first_from(new.mac, t0)
    outage = tl.outage_after(t0)
    if arp_new is None or outage is None or ready is None:
        raise ScenarioError("no ARP answer from the new primary, no client outage seen, or "
                            "no 'ready to accept connections' in its PostgreSQL log")
    entries = entries_after(new, t0)
    started = promote_started(entries)
    added = vip_added(entries)
    detection = hook_start - t0
    outage_s = outage[1] - outage[0]
    result: dict[str, Any] = {
        "mode": mode, "old": old.name, "new": new.name,
        "fault": "link down" if cut else "postmaster killed", "t0": t0,
        "detection_s": detection,
        "outage_s": outage_s,
        # what the mode adds once repmgrd has decided: the outage less repmgrd's detection
        # (its jitter, up to a monitoring interval, would hide a 0.1 s difference)
        "outage_after_decision_s": outage_s - detection,
        "handover_s": arp_new - ready.t,
        "client_reconnect_s": outage[1] - arp_new,
        "dark_s": dark_from_holders(tl.vip_samples, t0, new.name),
        "dark_client_s": dark_from_client(arp.frames, t0, new.mac),
        "max_vip_holders": _max_holders(tl, t0, window_end),
        "at": {  # seconds after the fault, for the picture and for checking by hand
            "hook_started": detection,
            "postgres_promoted": ready.t - t0,
            "arp_new_mac": arp_new - t0,
            "client_first_fail": outage[0] - t0,
            "client_ok_again": outage[1] - t0,
        },
    }
    # the client's attempts around the end of the outage, for reading by hand
    result["writes_near_end"] = [
        {"t": round(float(str(w["t"])) - t0, 3), "ok": w["ok"],
         **({"error": str(w.get("error", ""))[:80]} if not w["ok"] else {})}
        for w in list(tl.writes) if -1.5 <= float(str(w["t"])) - outage[1] <= 0.1]
    if mode == "ideal":
        moved = modes.moved_at(new.name, t0)
        if moved is not None:
            result["at"]["mover_moved"] = moved - t0
    else:
        if started is None or added is None:
            raise ScenarioError(f"{new.name}: no promote verdict or no VIP added in the journal")
        decided, result["fenced_by"] = started
        result["pre_promote_s"] = decided - hook_start
        result["vip_added_after_promotion_s"] = added_at(added) - ready.t
        result["vip_added_by"] = added.get("source")
        result["at"]["promote_started"] = decided - t0
        result["at"]["vip_added"] = added_at(added) - t0
    dark = result["dark_s"]
    say(f"    [{mode}] {result['fault']}: {old.name} -> {new.name}: outage {outage_s:.2f} s "
        f"(detection {detection:.2f} s), handover {result['handover_s'] * 1000:.0f} ms, "
        f"dark {'?' if dark is None else f'{dark * 1000:.0f} ms'}"
        + (f", hook before promote {result['pre_promote_s'] * 1000:.0f} ms (fenced by the "
           f"{result['fenced_by']})" if "pre_promote_s" in result else "")
        + f", max holders {result['max_vip_holders']}")
    return result


def rejoin(lab: Lab, tl: Timeline, old: Node, new: Node, cut: bool, say: Say) -> None:
    """The old primary back as a standby of the new one. A cut-off old primary still runs as
    a primary: it is killed before its link comes back (a clean stop would wait a minute for
    its WAL senders' dead links)."""
    if cut:
        lab.kill_postgres(old)
        lab.link_up(old)
        _wait(lab, f"VIP only on {new.name}", lambda: lab.vip_holders() == [new.name])
    lab.psql(new, "CHECKPOINT")  # pg_rewind reads the new timeline from the control file
    tl.action(f"repmgr node rejoin {old.name} (--force-rewind)")
    for attempt in range(REJOIN_TRIES):  # a link just back: "no route to host" for a moment
        done = lab.repmgr(old, "node", "rejoin", "-d", new.conninfo, "--force-rewind",
                          timeout=180, check=attempt == REJOIN_TRIES - 1)
        if done.returncode == 0:
            break
        time.sleep(1.0)
    _wait(lab, f"{old.name} in recovery", lambda: lab.is_in_recovery(old) is True)
    want = len(lab.nodes) - 1
    try:
        _wait(lab, f"{want} standbys streaming from {new.name}",
              lambda: lab.streaming_count(new) >= want, STRAGGLER_WAIT)
    except TimeoutError:
        # a standby that received more of the old primary's WAL than the new one has cannot
        # follow it (repmgrd's follow fails): rewind it as well, as an operator would
        for node in _stragglers(lab, new):
            say(f"    {node.name} did not follow {new.name}: rejoining it too")
            lab.stop_postgres(node, check=False)
            lab.repmgr(node, "node", "rejoin", "-d", new.conninfo, "--force-rewind",
                       timeout=180)
        try:
            _wait(lab, f"{want} standbys streaming from {new.name}",
                  lambda: lab.streaming_count(new) >= want)
        except TimeoutError as exc:
            raise ScenarioError(f"{exc}\n{lab.diagnostics()}") from exc
    lab.stop_repmgrd(old)  # its repmgrd watched a primary that died: start it afresh
    lab.start_repmgrd(old)
    say(f"    rejoined {old.name}")


def _stragglers(lab: Lab, new: Node) -> list[Node]:
    """Standbys not streaming from `new`."""
    names = lab.psql(new, "SELECT string_agg(application_name, ',') FROM pg_stat_replication "
                          "WHERE state = 'streaming'").split(",")
    return [n for n in lab.nodes if n is not new and n.name not in names]


def mode_order(rep: int) -> list[str]:
    """MODES rotated by the repetition number."""
    shift = (rep - 1) % len(MODES)
    return list(MODES[shift:] + MODES[:shift])


def run_repetition(nodes: int, rep: int, say: Say,
                   picture: Path | None = None) -> dict[str, Any]:
    """A fresh lab, every mode and fault, the figures; draws one failover if asked."""
    started = time.time()
    with Lab(nodes=nodes) as lab:
        say(f"  [{nodes} nodes, run {rep}] lab {lab.prefix} up in {lab.timings['up']:.1f} s")
        originals = original_confs(lab)
        node1 = lab.nodes[0]
        lab.psql(node1, "CREATE TABLE demo_writes(id bigserial PRIMARY KEY, "
                 "at timestamptz DEFAULT now(), node text)")
        result: dict[str, Any] = {"nodes": nodes, "rep": rep, "prefix": lab.prefix,
                                  "failovers": []}
        result["startup"] = measure_startup(lab, lab.nodes[-1])
        hooked_cluster(lab)
        _wait(lab, "VIP on node1", lambda: lab.vip_holders() == ["node1"])
        if rep == 1:
            result["proof"] = proof_check(lab, lab.nodes[1])
            lat = result["proof"].get("latency_ms", {})
            say(f"    ARP answer latency {lat.get('median', 0):.3f} ms median, "
                f"{lat.get('max', 0):.3f} ms max; LAN proofs that saw the holder: "
                f"{result['proof']['found']}/{result['proof']['proofs']}")
        # sampling costs CPU on a small machine: keep it about constant as nodes are added
        tl = Timeline(lab, interval=0.01 if nodes <= 3 else 0.02,
                      writer_interval=WRITER_INTERVAL,
                      role_interval=max(ROLE_INTERVAL, 0.07 * nodes))
        modes = Modes(lab, originals)
        try:
            with ProcWatch(f"{lab.workdir}/") as procs, ArpWatch(lab) as arp, tl:
                _wait(lab, "client writes through the VIP",
                      lambda: any(w["ok"] for w in tl.writes))
                time.sleep(SETTLE)
                for mode in mode_order(rep):
                    primary = lab.primary()
                    assert primary is not None
                    modes.switch(mode, primary)
                    if mode == "daemon":
                        warm = modes.links_warm_s
                        say("    daemons' warm links to every peer "
                            + (f"up after {warm:.1f} s" if warm is not None else "NOT all up"))
                        result["links_warm_s"] = warm
                    time.sleep(SETTLE)
                    for _name, cut in FAULTS:
                        figures = failover(lab, tl, arp, procs, modes, cut=cut, say=say)
                        result["failovers"].append(figures)
                        if picture is not None and mode == "daemon" and not cut:
                            result["picture"] = draw_failover(tl, figures, picture, nodes)
                            say(f"    {result['picture']}")
                        rejoin(lab, tl, lab.node(figures["old"]), lab.node(figures["new"]),
                               cut, say)
        finally:
            modes.close()
    result["seconds"] = time.time() - started
    return result


def draw_failover(tl: Timeline, figures: dict[str, Any], path: Path, nodes: int) -> str:
    """One failover as a PNG, with the measured instants as markers."""
    from demo.plot import write_png

    t0 = float(figures["t0"])
    at = figures["at"]
    labels = {
        "hook_started": "repmgrd starts promote_command (repmgr-vip promote)",
        "promote_started": "fencing done; repmgr standby promote starts (journal)",
        "postgres_promoted": f"PostgreSQL on {figures['new']} accepts writes (its log)",
        "vip_added": f"VIP added on {figures['new']} (journal)",
        "arp_new_mac": f"client sees {figures['new']}'s MAC for the VIP (ARP)",
        "client_ok_again": "client writes OK again",
    }
    markers = [(t0 + float(at[k]), text) for k, text in labels.items() if k in at]
    end = t0 + float(at["client_ok_again"]) + 2.0
    title = (f"Failover, {nodes} nodes, daemons up: {figures['old']}'s PostgreSQL killed, "
             f"{figures['new']} promoted by repmgrd, VIP moved by repmgr-vip "
             f"(client outage {figures['outage_s']:.2f} s, repmgrd's detection "
             f"{figures['detection_s']:.2f} s)")
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
    """`repmgr-vip daemon` on every node of a quiet cluster: RSS, CPU and forks per minute.

    CPU counts the daemon and the helper processes it waited for (ip, arping, ssh), from
    /proc/PID/stat, over `seconds` after a warm-up of DAEMON_WARMUP (start-up: imports, the
    first connections, and the SSH masters, whose foreground `ssh -f` processes the keeper
    reaps at its second round, 30 s in: their CPU would land in the window otherwise; it is
    reported apart as `startup_cpu_s`). Then the processes each daemon starts, over a second
    window of `seconds` with strace on it (bench/procwatch.count_forks), so the tracing
    never touches the CPU figure. Per hour is the CPU rate times 3600.
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
        time.sleep(1.0)
        pids = {n.name: _daemon_pid(lab, n) for n in lab.nodes}
        gone = [name for name, pid in pids.items() if pid is None]
        if gone:
            return {"error": f"daemon not running on {gone}"}
        born = {name: _cpu_ticks(pid) for name, pid in pids.items() if pid}
        time.sleep(max(0.0, DAEMON_WARMUP - 1.0))
        start = {name: _cpu_ticks(pid) for name, pid in pids.items() if pid}
        load_start = os.getloadavg()[0]
        began = time.monotonic()
        sessions = new_sessions(lab, seconds)
        elapsed = time.monotonic() - began
        load_end = os.getloadavg()[0]
        end = {name: _cpu_ticks(pid) for name, pid in pids.items() if pid}
        rss_at = {name: _rss_kib(pid) for name, pid in pids.items() if pid}
        with ThreadPoolExecutor(max_workers=len(pids)) as pool:
            forks = dict(zip(pids, pool.map(lambda pid: count_forks(pid, seconds),
                                            [p for p in pids.values() if p]), strict=True))
        per_node = {}
        for name, pid in pids.items():
            assert pid is not None
            cpu = (end[name] - start[name]) / clk
            rss, hwm = rss_at[name]
            per_node[name] = {"cpu_s_per_hour": cpu / elapsed * 3600, "rss_mib": rss / 1024,
                              "peak_rss_mib": hwm / 1024,
                              "startup_cpu_s": (start[name] - born[name]) / clk,
                              "sessions_per_min": sessions["per_minute"][name],
                              "sessions_per_min_without": lab_sessions["per_minute"][name]}
            per_node[name]["sessions_per_min_daemons"] = (
                per_node[name]["sessions_per_min"] - per_node[name]["sessions_per_min_without"])
            if "forks_per_min" in forks[name]:
                per_node[name]["forks_per_min"] = forks[name]["forks_per_min"]
            per_node[name]["forks"] = forks[name]
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
    say(f"  daemon at {nodes} nodes, period {period} s, {elapsed:.0f} s after a "
        f"{DAEMON_WARMUP:.0f} s warm-up, load average {load_start:.2f} -> {load_end:.2f}: "
        + ", ".join(f"{k} {v['rss_mib']:.1f} MiB {v['cpu_s_per_hour'] / 36.0:.2f} % "
                    f"{v.get('forks_per_min', float('nan')):.0f} forks/min"
                    for k, v in per_node.items()))
    say("  new PostgreSQL sessions per minute, daemons running (without daemons): "
        + ", ".join(f"{k} {v['sessions_per_min']:.0f} ({v['sessions_per_min_without']:.0f})"
                    for k, v in per_node.items()))
    return {"period_s": period, "seconds": elapsed, "warmup_s": DAEMON_WARMUP,
            "loadavg": [load_start, load_end], "per_node": per_node,
            "vip_holders_after": holders, "links": links}
