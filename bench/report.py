"""The Markdown table: every goal of issue 10 with its figure, medians and spreads per size."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

MODE_TEXT = {"ideal": "ideal mover", "daemon": "repmgr-vip, daemons up",
             "hooks": "repmgr-vip, hooks only"}
FAULT_TEXT = {"alive": "Failover: old primary's PostgreSQL killed, host alive",
              "down": "Failover: old primary's host cut off (link down, SSH unreachable)"}


@dataclass(frozen=True)
class Row:
    key: str  # figure name in a failover's result
    label: str
    modes: tuple[str, ...]
    goal: float | None = None  # seconds; met when the median is below it
    goal_modes: tuple[str, ...] = ()  # the modes the goal is about
    note: int = 0
    unit: str = "s"


FAILOVER_ROWS = (
    Row("outage_s", "client write outage through the VIP", ("ideal", "daemon", "hooks"),
        note=2),
    Row("detection_s", "repmgrd's detection: fault \u2192 it starts promote_command",
        ("ideal", "daemon", "hooks"), note=3),
    Row("pre_promote_s", "time the hook adds before `repmgr standby promote` starts",
        ("daemon", "hooks"), 0.050, ("daemon",), 5),
    Row("handover_s", "handover: PostgreSQL promoted \u2192 client sees the new MAC",
        ("ideal", "daemon", "hooks"), 0.050, ("daemon",), 1),
    Row("dark_s", "dark window: no node holds the VIP (10 ms sampler of every node)",
        ("ideal", "daemon", "hooks"), 0.050, ("daemon",), 6),
    Row("dark_client_s", "dark window as the client sees it (ARP asked every 5 ms)",
        ("ideal", "daemon", "hooks"), None, (), 7),
    Row("client_reconnect_s", "client: new MAC seen \u2192 first write OK",
        ("ideal", "daemon", "hooks"), None, (), 8),
    Row("max_vip_holders", "most nodes holding the VIP at once (sampler)",
        ("ideal", "daemon", "hooks"), None, (), 9, "count"),
)
EXTRA_GOALS = {"daemon": 0.100, "hooks": 0.500}  # over the ideal mover

NOTES = {
    1: "From the promoted server's own log line `database system is ready to accept "
       "connections` (postgresql.log, ms) to the first ARP frame for the VIP carrying the new "
       "primary's MAC, seen by a raw-socket poller in the client namespace (bench/arpwatch.py "
       "asks every 5 ms; the new holder's gratuitous ARP counts too).",
    2: "Client writer (demo/writer.py, one INSERT through the VIP every 20 ms, a kept "
       "connection, connect timeout 1 s): from the first failed attempt after the fault to "
       "the first successful one. A failed attempt counts from when it began, a success from "
       "when it completed.",
    3: "From the fault (kill -9 / link down, bench clock) to the kernel start time of the "
       "promote_command process repmgrd starts (/proc/PID/stat, 10 ms ticks). repmgr's own "
       "doing, the same for every mode; it varies by up to a monitoring interval with the "
       "moment of the fault.",
    4: "Each mode's median of (outage \u2212 detection, row 2 \u2212 row 3, per failover) "
       "minus the ideal mover's, same size and fault: what the mode adds to the client's "
       "outage once repmgrd has decided. Taking repmgrd's detection out removes its jitter, "
       "which is larger than the goal. In brackets: the two medians.",
    5: "Kernel start time of the promote_command process to the promote step's verdict in "
       "the new primary's decision journal (written when fencing is done, just before it "
       "starts `repmgr standby promote`): interpreter start, imports, lock, fencing.",
    6: "From the last sample in which another node held the VIP to the first in which the new "
       "primary did, when a sample with no holder lay between (0 otherwise). Read over "
       "netlink from every node's namespace every 10 ms (20 ms at 7 nodes); a node without "
       "carrier counts as not holding (so with the host cut off the window starts at the cut "
       "and is mostly repmgrd's detection: no goal there).",
    7: "bench/arpwatch.py in the client namespace: from the last ARP answer of any MAC to the "
       "first answer from the new primary's MAC, when the answers stopped for more than "
       "12 ms between (0 otherwise).",
    8: "From the first ARP frame with the new MAC (row 1) to the client's first successful "
       "write: a connection attempt whose SYN went unanswered waits for its retransmission "
       "(1 s).",
    9: "The largest number of nodes (with carrier) holding the VIP in one sample, from the "
       "fault until one second after the client wrote again. Must be 1.",
    10: "bench/startup.py inside a lab node as postgres, with the command's own interpreter "
        "(the Debian package's /usr/bin/repmgr-vip: python3 -I -S): median of 10 runs of "
        "`repmgr-vip --help`, of the generated promote hook line against a stand-in daemon "
        "that greets and refuses at once (start-up, the quick start's imports, one "
        "connection), and of `python3 -c pass`; `python -X importtime` (sum of top-level "
        "cumulative times) of the promote hook's modules and of psycopg.",
    11: "`repmgr-vip daemon` on every node of a quiet cluster, as the systemd unit runs it "
        "(ambient CAP_NET_ADMIN/CAP_NET_RAW), default settings: VmRSS from /proc/PID/status at "
        "the end; CPU = utime+stime of the daemon and the helper processes it waited for, over "
        "the window (which starts after a 40 s warm-up, BENCH_DAEMON_WARMUP: imports, first "
        "connections, the SSH masters; their CPU is the start-up row), as a share of one core. "
        "Processes started: strace (fork family, seccomp-bpf) on each daemon over a second "
        "window as long, after the CPU one. Median over nodes, min\u2013max across nodes.",
    12: "`pg_stat_database.sessions` summed over databases on every node, read at the start "
        "and the end of the daemon window (row 11), and over a window of up to 30 s just "
        "before the daemons start (repmgrd's own sessions); the difference is the daemons' "
        "share (goal 0: under 5 per minute counts as met, the jitter of repmgrd's own). "
        "Median over nodes, min\u2013max across nodes.",
    13: "bench/dark.py, on the first run of each size, from node2 (as root, its namespace) "
        "while node1 holds the VIP: one RFC 5227 probe (sender 0.0.0.0) and the time until "
        "the holder's answer, 200 times; then 100 LAN proofs (arp.lan_probe: three probes "
        "20 ms apart, 80 ms window) and how many saw the holder.",
}


def fmt(seconds: float) -> str:
    text = f"{seconds * 1000:.0f} ms" if abs(seconds) < 1.0 else f"{seconds:.2f} s"
    return text.replace("-", "\u2212")


def _spread(median: float, low: float, high: float) -> str:
    """`20 ms (14\u201321)`: the median's unit for all three; `to` where a sign would clash."""
    scale, unit, digits = (1000.0, "ms", 0) if abs(median) < 1.0 else (1.0, "s", 2)

    def num(value: float) -> str:
        return f"{value * scale:.{digits}f}".replace("-", "\u2212")

    joint = "\u2013" if low >= 0 else " to "
    return f"{num(median)} {unit} ({num(low)}{joint}{num(high)})"


def failover_values(runs: list[dict[str, Any]], mode: str, fault: str,
                    key: str) -> list[float]:
    out = []
    for run in runs:
        for figures in run.get("failovers", []):
            if figures.get("mode") != mode or _fault(figures) != fault:
                continue
            value = figures.get(key)
            if isinstance(value, int | float):
                out.append(float(value))
    return out


def _fault(figures: dict[str, Any]) -> str:
    return "down" if figures.get("fault") == "link down" else "alive"


def cell(vals: list[float], unit: str = "s") -> str:
    if not vals:
        return "n/a"
    median = statistics.median(vals)
    if unit == "count":
        return f"{median:g}" + (f" (max {max(vals):g})" if len(vals) > 1 else "")
    if unit != "s":
        if len(vals) == 1:
            return f"{median:.1f} {unit}"
        return f"{median:.1f} {unit} ({min(vals):.1f}\u2013{max(vals):.1f})"
    if len(vals) == 1:
        return fmt(median)
    return _spread(median, min(vals), max(vals))


def _met(vals: list[float], goal: float) -> str:
    return "n/a" if not vals else ("yes" if statistics.median(vals) < goal else "no")


def failover_lines(runs: dict[int, list[dict[str, Any]]], sizes: list[int],
                   fault: str) -> list[str]:
    lines = [f"| **{FAULT_TEXT[fault]}** |" + " |" * len(sizes) + " | |"]
    for mode, extra_goal in EXTRA_GOALS.items():
        cells, met = [], []
        for size in sizes:
            ours = failover_values(runs[size], mode, fault, "outage_after_decision_s")
            ideal = failover_values(runs[size], "ideal", fault, "outage_after_decision_s")
            if not ours or not ideal:
                cells.append("n/a")
                met.append("n/a")
                continue
            extra = statistics.median(ours) - statistics.median(ideal)
            cells.append(f"{fmt(extra)} ({fmt(statistics.median(ours))} vs "
                         f"{fmt(statistics.median(ideal))})")
            met.append("yes" if extra < extra_goal else "no")
        lines.append(f"| client outage over the ideal mover, {MODE_TEXT[mode]} [4] | "
                     + " | ".join(cells) + f" | < {fmt(extra_goal)} | " + " / ".join(met)
                     + " |")
    for row in FAILOVER_ROWS:
        for mode in row.modes:
            by_size = {s: failover_values(runs[s], mode, fault, row.key) for s in sizes}
            goal = row.goal if mode in row.goal_modes and not (
                row.key == "dark_s" and fault == "down") else None
            goal_cells = (f"< {fmt(goal)} | " + " / ".join(_met(by_size[s], goal)
                                                            for s in sizes)) if goal else " | "
            lines.append(f"| {row.label}, {MODE_TEXT[mode]} [{row.note}] | "
                         + " | ".join(cell(by_size[s], row.unit) for s in sizes)
                         + f" | {goal_cells} |")
    return lines


def daemon_lines(daemon: dict[int, dict[str, Any]], sizes: list[int]) -> list[str]:
    lines = []
    specs = (("rss_mib", "resident memory", "MiB", 11, 40.0),
             ("cpu_percent", "CPU, % of one core", "%", 11, 0.5),
             ("forks_per_min", "processes the daemon starts per minute", "/min", 11, None),
             ("startup_cpu_s", "CPU at start-up (the warm-up left out of the window)", "s", 11,
              None),
             ("sessions_per_min", "new PostgreSQL sessions per minute per node, daemons "
              "running", "/min", 12, None),
             ("sessions_per_min_without", "the same without daemons (repmgrd's own)", "/min",
              12, None),
             ("sessions_per_min_daemons", "new sessions per minute per node caused by the "
              "daemons", "/min", 12, 5.0))
    for key, label, unit, note, goal in specs:
        cells, met = [], []
        for size in sizes:
            result = daemon.get(size, {})
            per_node = result.get("per_node", {})
            vals = [float(v[key]) for v in per_node.values() if key in v] if per_node else []
            if key == "cpu_percent" and per_node:
                vals = [float(v["cpu_s_per_hour"]) / 36.0 for v in per_node.values()]
            if vals and key in ("forks_per_min", "startup_cpu_s"):
                digits = 1 if unit == "s" else 0
                cells.append(f"{statistics.median(vals):.{digits}f} {unit} ({min(vals):.{digits}f}"
                             f"\u2013{max(vals):.{digits}f})")
                met.append("n/a")
            elif vals:
                cells.append(cell(vals, unit) if unit != "%" else
                             f"{statistics.median(vals):.2f} % ({min(vals):.2f}\u2013"
                             f"{max(vals):.2f})")
                met.append("n/a" if goal is None else
                           ("yes" if statistics.median(vals) < goal else "no"))
            else:
                cells.append(f"not measured: {result.get('error', 'no run')}")
                met.append("n/a")
        goal_text = "" if goal is None else (
            "0 (< 5)" if key == "sessions_per_min_daemons" else f"< {goal:g} {unit}")
        lines.append(f"| {label} [{note}] | " + " | ".join(cells) + f" | {goal_text} | "
                     + (" / ".join(met) if goal is not None else "") + " |")
    loads = []
    for size in sizes:
        load = daemon.get(size, {}).get("loadavg")
        loads.append(f"{load[0]:.2f} \u2192 {load[1]:.2f}" if load else "n/a")
    lines.append("| load average over the daemon window (2 CPUs; other labs may run) [11] | "
                 + " | ".join(loads) + " | | |")
    return lines


def proof_lines(runs: dict[int, list[dict[str, Any]]], sizes: list[int]) -> list[str]:
    cells_lat, cells_found = [], []
    for size in sizes:
        proof = next((r["proof"] for r in runs[size] if "proof" in r), None)
        if proof is None or "latency_ms" not in proof:
            cells_lat.append("n/a")
            cells_found.append("n/a")
            continue
        lat = proof["latency_ms"]
        cells_lat.append(f"{lat['median']:.2f} ms (p99 {lat['p99']:.2f}, max "
                         f"{lat['max']:.2f}); {proof['answered']}/{proof['rounds']} answered")
        cells_found.append(f"{proof['found']}/{proof['proofs']}")
    return ["| **ARP proof (the daemon's LAN proof)** |" + " |" * len(sizes) + " | |",
            "| a holder's answer to one probe [13] | " + " | ".join(cells_lat) + " | | |",
            "| LAN proofs (80 ms) that saw the present holder [13] | "
            + " | ".join(cells_found) + " | all | "
            + " / ".join("yes" if c != "n/a" and c.split("/")[0] == c.split("/")[1] else
                         "n/a" if c == "n/a" else "no" for c in cells_found) + " |"]


def startup_lines(runs: dict[int, list[dict[str, Any]]], sizes: list[int]) -> list[str]:
    lines = ["| **Hook command start-up, no cluster work** |" + " |" * len(sizes) + " | |"]
    for key, label in (("help_median_s", "`repmgr-vip --help`, wall time"),
                       ("quick_hook_median_s", "the promote hook line, start to the verdict "
                        "of a daemon that answers at once, wall time"),
                       ("python_pass_median_s", "`python3 -c pass`, wall time (the floor)"),
                       ("quick_imports_s", "importing the quick promote hook (cli/quick.py)"),
                       ("hook_imports_s", "importing the full CLI's promote modules"),
                       ("psycopg_import_s", "importing psycopg")):
        cells = []
        for size in sizes:
            vals = [float(r["startup"][key]) for r in runs[size]
                    if isinstance(r.get("startup", {}).get(key), int | float)]
            cells.append(cell(vals))
        lines.append(f"| {label} [10] | " + " | ".join(cells) + " | | |")
    return lines


def markdown(runs: dict[int, list[dict[str, Any]]], daemon: dict[int, dict[str, Any]],
             daemon_period: str) -> str:
    sizes = sorted(runs)
    head = " | ".join(f"{s} nodes (n={len(runs[s])})" for s in sizes)
    lines = [f"| figure | {head} | goal | met at " + " / ".join(str(s) for s in sizes) + " |",
             "|---|" + "---|" * len(sizes) + "---|---|"]
    for fault in ("alive", "down"):
        lines += failover_lines(runs, sizes, fault)
    period = f", period {daemon_period} s" if daemon_period else ""
    lines.append(f"| **Daemon (`repmgr-vip daemon`, default settings{period})** |"
                 + " |" * len(sizes) + " | |")
    lines += daemon_lines(daemon, sizes)
    lines += proof_lines(runs, sizes)
    lines += startup_lines(runs, sizes)
    lines.append("")
    lines.append("Each cell: median (min\u2013max) over the runs. How each figure is measured:")
    lines.append("")
    lines += [f"{n}. {text}" for n, text in NOTES.items()]
    return "\n".join(lines)
