"""The Markdown table (medians and spreads per cluster size) and how each figure is measured."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    key: str  # figure name inside its section of a run's result
    label: str
    goal: float | None = None  # seconds; a figure meets it when its median is below it
    note: int = 0  # footnote number


FAILOVER_ROWS = (
    Row("handover_s", "handover: PostgreSQL promoted \u2192 client sees the new MAC", 0.100, 1),
    Row("after_repmgr_s", "`standby promote` exited \u2192 client sees the new MAC", None, 14),
    Row("outage_s", "client write outage through the VIP", None, 2),
    Row("repmgr_s", "repmgr's own failure \u2192 promotion, same run", None, 3),
    Row("added_s", "added by repmgr-vip (outage \u2212 repmgr's own)", 0.300, 4),
    Row("vip_step_s", "VIP step: the hook's time around repmgr", None, 5),
    Row("hook_startup_s", "\u00b7 hook start-up: process start \u2192 fencing begins", 0.150, 8),
    Row("fencing_s", "\u00b7 fencing (release elsewhere, ARP proves free)", None, 6),
    Row("pre_promote_s", "hook process start \u2192 it runs `repmgr standby promote`", None, 12),
    Row("client_reconnect_s", "client: new MAC seen \u2192 first write OK", None, 13),
    Row("event_hooks_in_promote_s", "our event hook inside `standby promote`", None, 7),
)
SECTIONS: tuple[tuple[str, str, tuple[Row, ...]], ...] = (
    ("Failover: old primary's PostgreSQL killed, host alive", "failover_alive", FAILOVER_ROWS),
    ("Failover: old primary's host cut off (link down, SSH unreachable)", "failover_down",
     FAILOVER_ROWS),
    ("Planned switchover (`repmgr standby switchover --siblings-follow`)", "switchover", (
        Row("outage_s", "client write outage through the VIP", None, 2),
        Row("duration_s", "the switchover command's own duration", None, 9),
    )),
    ("Hook command start-up, no cluster work", "startup", (
        Row("help_median_s", "`repmgr-vip --help`, wall time", None, 10),
        Row("hook_imports_s", "importing the promote hook's modules", None, 10),
        Row("psycopg_import_s", "importing psycopg (the hook reads the node list)", None, 10),
    )),
)

NOTES = {
    1: "From the promoted server's own log line `database system is ready to accept "
       "connections` (postgresql.log, ms) to the first ARP frame for the VIP carrying the new "
       "primary's MAC, seen by a raw-socket poller in the client namespace (bench/arpwatch.py "
       "asks every 5 ms; the new holder's gratuitous ARP counts too).",
    2: "Client writer (demo/writer.py, one INSERT through the VIP every 20 ms, connect timeout "
       "as libpq allows): from the first failed attempt after the fault to the first "
       "successful one. A failed attempt counts from when it began, a success from when it "
       "completed.",
    3: "What repmgr alone takes: from the fault (kill -9 / link down, bench clock) to the "
       "moment repmgrd starts promote_command (detection and election; kernel start time of "
       "the hook process, /proc/PID/stat, 10 ms ticks), plus from the hook's `running "
       ".../repmgr standby promote` line to the promoted server's `ready to accept "
       "connections` log line. The hook's own time before it calls repmgr is left out.",
    4: "Row 2 minus row 3 on the same run: everything this project puts between the fault and "
       "the client writing again, including the client's own reconnect (TCP SYN "
       "retransmission to a VIP that was briefly nowhere).",
    5: "Hook process start → `running .../repmgr standby promote` line (row 12), plus the "
       "handover (row 1). Row 4 is this plus the client's reconnect (row 13).",
    6: "The duration fence_others measures itself, from the `promote: fencing: ... (N s)` line.",
    7: "`repmgr-vip event` processes for `standby_promote` that repmgr runs synchronously "
       "inside `standby promote`: kernel start time to last sighting in /proc (20 ms scans). "
       "They run after PostgreSQL accepts writes, so they delay repmgr's return and its "
       "followers, not the clients.",
    8: "Kernel start time of the hook process (10 ms ticks) to the start of fencing (the "
       "fencing line's time minus its own duration): interpreter, imports, config, lock, "
       "reading the node list from PostgreSQL.",
    9: "Wall time of `repmgr standby switchover --siblings-follow` as run by the bench.",
    10: "bench/startup.py inside a lab node as postgres: median of 10 runs of "
        "`repmgr-vip --help`; `python -X importtime` (sum of top-level cumulative times) of "
        "`import repmgr_vip.cli.main, repmgr_vip.app.hooks`, and of `import psycopg`, which "
        "the hook loads to read the node list.",
    11: "`repmgr-vip daemon` on every node of a quiet cluster with the default config: VmRSS "
        "from /proc/PID/status at the end; CPU = utime+stime of the daemon and the helper "
        "processes it waited for, over the measuring window, scaled to one hour. Median over "
        "nodes, min\u2013max across nodes.",
    12: "The issue's literal definition (`repmgr-vip promote` until it calls repmgr): kernel "
        "start time of the hook process to its `running .../repmgr ... standby promote` line; "
        "start-up (row 8) plus fencing (row 6).",
    13: "From the first ARP frame with the new MAC (row 1) to the client's first successful "
        "write: the client's TCP connect retrying (SYNs sent while the VIP was on no node "
        "are retransmitted after 1 s, then 2 s).",
    14: "The issue's wording of the handover: from the `standby promote exited 0` line in the "
        "hook's log to the same ARP frame as row 1. Negative when the hook adds the VIP as "
        "soon as PostgreSQL leaves recovery, before `repmgr standby promote` has noticed "
        "(it checks once per promote_check_interval, 1 s).",
    15: "`pg_stat_database.sessions` summed over databases on every node, read by one psql at "
        "the start and one at the end of the daemon window (row 11), and of a window of up to "
        "30 s just before the daemons start. repmgrd starts about one backend per node per "
        "second by itself (more on the primary, whose standbys' repmgrd ping it); the "
        "difference is the daemons' share (goal 0: under 5 per minute counts as met, the "
        "jitter of repmgrd's own). Median over nodes, min\u2013max across nodes.",
    16: "bench/sshwarm.py, after the daemon window, as postgres on node1 with the daemons "
        "running: what fencing does first (`repmgr-vip release` over SSH on every other "
        "node at once), timed until every session exited 0. Cold rounds close every SSH "
        "master first (`ssh -O exit`): each ssh connects and authenticates anew, as without "
        "warm links; warm rounds use the masters the daemon keeps (OpenSSH ControlMaster). "
        "Interleaved, 5 of each; median (min\u2013max).",
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


def values(runs: list[dict[str, Any]], section: str, key: str) -> list[float]:
    out = []
    for run in runs:
        value = run.get(section, {}).get(key)
        if isinstance(value, int | float):
            out.append(float(value))
    return out


def cell(vals: list[float], unit: str = "s") -> str:
    if not vals:
        return "n/a"
    median = statistics.median(vals)
    if unit != "s":
        if len(vals) == 1:
            return f"{median:.1f} {unit}"
        return f"{median:.1f} {unit} ({min(vals):.1f}\u2013{max(vals):.1f})"
    if len(vals) == 1:
        return fmt(median)
    return _spread(median, min(vals), max(vals))


def goal_text(row: Row, by_size: dict[int, list[float]]) -> str:
    if row.goal is None:
        return ""
    met = []
    for _size, vals in sorted(by_size.items()):
        met.append("n/a" if not vals else ("yes" if statistics.median(vals) < row.goal
                                           else "no"))
    return f"< {fmt(row.goal)}: " + " / ".join(met)


def daemon_rows(daemon: dict[int, dict[str, Any]], sizes: list[int]) -> list[str]:
    lines = []
    for key, label, unit, note, goal in (
            ("rss_mib", "resident memory", "MiB", 11, ""),
            ("cpu_s_per_hour", "CPU time per hour", "CPU-s", 11, ""),
            ("sessions_per_min", "new PostgreSQL sessions per minute per node, daemons "
             "running", "/min", 15, ""),
            ("sessions_per_min_without", "the same without daemons (repmgrd's own checks)",
             "/min", 15, ""),
            ("sessions_per_min_daemons", "new sessions per minute per node caused by the "
             "daemons (difference)", "/min", 15, "0")):
        cells = []
        met = []
        for size in sizes:
            result = daemon.get(size, {})
            if "per_node" in result and all(key in v for v in result["per_node"].values()):
                vals = [float(v[key]) for v in result["per_node"].values()]
                cells.append(cell(vals, unit))
                # jitter of repmgrd's own sessions: a few per minute either way
                met.append("yes" if statistics.median(vals) < 5 else "no")
            else:
                cells.append(f"not measured: {result.get('error', 'daemon not available')}")
                met.append("n/a")
        goal_cell = f"{goal}: " + " / ".join(met) if goal else ""
        lines.append(f"| {label} [{note}] | " + " | ".join(cells) + f" | {goal_cell} |")
    for mode, what in (("release", "remote release on every other node in parallel"),
                       ("true", "the SSH transport alone (`ssh HOST true`)")):
        for temp in ("cold", "warm"):
            cells = []
            for size in sizes:
                links = daemon.get(size, {}).get("links", {})
                if mode in links:
                    cells.append(cell([float(v) for v in links[mode][f"{temp}_s"]]))
                else:
                    why = links.get("error") or daemon.get(size, {}).get("error", "no run")
                    cells.append(f"not measured: {why}")
            link = ("fresh connections" if temp == "cold"
                    else "over the daemon's SSH masters")
            lines.append(f"| fencing's SSH step: {what}, {link} [16] | "
                         + " | ".join(cells) + " |  |")
    return lines


def markdown(runs: dict[int, list[dict[str, Any]]], daemon: dict[int, dict[str, Any]],
             daemon_period: str) -> str:
    sizes = sorted(runs)
    head = " | ".join(f"{s} nodes (n={len(runs[s])})" for s in sizes)
    lines = [f"| figure | {head} | goal: met at " + " / ".join(str(s) for s in sizes) + " |",
             "|---|" + "---|" * len(sizes) + "---|"]
    for title, section, rows in SECTIONS:
        lines.append(f"| **{title}** |" + " |" * len(sizes) + " |")
        for row in rows:
            by_size = {s: values(runs[s], section, row.key) for s in sizes}
            cells = " | ".join(cell(by_size[s]) for s in sizes)
            lines.append(f"| {row.label} [{row.note}] | {cells} | {goal_text(row, by_size)} |")
    period = f", period {daemon_period} s" if daemon_period else ""
    lines.append(f"| **Daemon (`repmgr-vip daemon`, default settings{period})** |"
                 + " |" * len(sizes) + " |")
    lines += daemon_rows(daemon, sizes)
    lines.append("")
    lines.append("Each cell: median (min\u2013max) over the runs. How each figure is measured:")
    lines.append("")
    lines += [f"{n}. {text}" for n, text in NOTES.items()]
    return "\n".join(lines)
