"""`make bench` / `python -m bench`: repeated failovers in the lab against an ideal mover.

Each repetition (bench/scenario.py) runs, in one fresh lab, a failover with the old primary's
host alive and one with it cut off, for each of: the ideal mover (baseline), repmgr-vip with
daemons, repmgr-vip hooks only. Environment: BENCH_RUNS=N repetitions per cluster size
(default 3 at 3 nodes, 2 at 7; quick: BENCH_SIZES=3 BENCH_RUNS=1), BENCH_SIZES=3,7 cluster
sizes, BENCH_DAEMON_SECONDS=30 how long the quiet daemons are watched (0 skips it),
BENCH_FROZEN_LEASE=4,20 adds a frozen-primary failover per vip.lease value
(bench/frozen.py; off by default), BENCH_PARTS=failover,addresses which parts run
(`addresses`: the dual-stack VIP and the replica VIP, bench/addresses.py; alone it is
`python -m bench.addresses`; `quiet`: only the quiet daemons' CPU, forks, memory and
sessions at each size, as the failover part ends with: bench/results/quiet.md). Prints a
Markdown table; writes bench/results/latest.json and bench/results/failover.png (the first
failover at the smallest size).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import addresses
from bench.frozen import frozen_failover, frozen_table
from bench.report import NOTES, daemon_lines, markdown
from bench.scenario import daemon_available, measure_daemon, run_repetition
from bench.startup import interpreter
from lab import PG_BIN, list_runs, missing_prerequisites
from tests.integration.vipconf import REPMGR_VIP

RESULTS = Path(__file__).parent / "results"
DEFAULT_RUNS = {3: 3, 7: 3}


def say(text: str) -> None:
    print(text, flush=True)


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    return (result.stdout or result.stderr).strip().splitlines()[0] if (
        result.stdout or result.stderr).strip() else ""


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": os.getloadavg(),
        "other_labs_at_start": sorted(list_runs()),
        "repmgr_vip": _first_line([REPMGR_VIP, "--version"]),
        "git": _first_line(["git", "-C", str(Path(__file__).parent), "describe", "--always",
                            "--dirty"]),
        "repmgr": _first_line([f"{PG_BIN}/repmgr", "--version"]),
        "postgresql": _first_line([f"{PG_BIN}/postgres", "--version"]),
        "python": sys.version.split()[0],
    }


def _digest(package: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        path = package / name
        digest.update(name.encode() + (path.read_bytes() if path.exists() else b"missing"))
    return digest.hexdigest()[:12]


def _source_names() -> list[str]:
    """The checkout's modules, relative to the package (subpackages included); a stale file
    beside them in the installed copy (left by an old build/) is not code anyone imports."""
    source = Path(__file__).resolve().parent.parent / "src" / "repmgr_vip"
    return sorted(str(p.relative_to(source)) for p in source.rglob("*.py"))


def installed_digest() -> str:
    """A digest of the installed repmgr_vip sources: tells whether they changed mid-run."""
    result = subprocess.run([interpreter(REPMGR_VIP), "-c",
                             "import repmgr_vip; print(repmgr_vip.__file__)"],
                            capture_output=True, text=True, check=False)
    return _digest(Path(result.stdout.strip()).parent, _source_names())


def measured_version() -> str:
    """Which code the figures belong to: a commit, when the installed package is exactly it."""
    checkout = Path(__file__).resolve().parent.parent
    head = _first_line(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(checkout), "status", "--porcelain", "--", "src"])
    if installed_digest() != _digest(checkout / "src" / "repmgr_vip", _source_names()):
        return f"installed package differs from the checkout's src (HEAD {head})"
    return f"commit {head}" + (" with uncommitted changes in src/" if dirty else "")


def _sizes() -> list[int]:
    raw = os.environ.get("BENCH_SIZES", "3,7")
    return [int(part) for part in raw.split(",") if part.strip()]


def _runs_for(size: int) -> int:
    if os.environ.get("BENCH_RUNS"):
        return int(os.environ["BENCH_RUNS"])
    return DEFAULT_RUNS.get(size, 3)


def _parts() -> set[str]:
    return {p.strip() for p in os.environ.get("BENCH_PARTS", "failover,addresses").split(",")
            if p.strip()}


def main() -> int:
    missing = missing_prerequisites()
    if missing:
        say("bench: cannot build the lab: " + "; ".join(missing) + " (run `make setup` as root)")
        return 2
    if not _parts() or _parts() - {"failover", "addresses", "quiet"}:
        say("bench: BENCH_PARTS takes failover, addresses and/or quiet (comma-separated)")
        return 2
    if "failover" not in _parts():
        code = quiet() if "quiet" in _parts() else 0
        return addresses.main() if "addresses" in _parts() else code
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = machine()
    meta["installed_digest_start"] = installed_digest()
    meta["measured_version"] = measured_version()
    sizes = _sizes()
    daemon_seconds = float(os.environ.get("BENCH_DAEMON_SECONDS", "30"))
    say(f"bench: {meta['nproc']} CPUs, kernel {meta['kernel']}, {meta['repmgr_vip']}; "
        f"sizes {sizes}, runs {[_runs_for(s) for s in sizes]}; other labs running: "
        f"{len(meta['other_labs_at_start'])}")
    started = time.monotonic()
    runs: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
    failed: list[dict[str, Any]] = []
    picture = RESULTS / "failover.png"
    for size in sizes:
        for rep in range(1, _runs_for(size) + 1):
            draw = picture if size == sizes[0] and not runs[size] else None
            try:
                runs[size].append(run_repetition(size, rep, say, draw))
            except Exception as exc:  # one bad run must not lose the others' figures
                say(f"    run failed: {exc!r}"[:2000])
                failed.append({"nodes": size, "rep": rep, "error": repr(exc)[:4000],
                               "traceback": traceback.format_exc()[-4000:]})
    frozen: list[dict[str, Any]] = []
    for lease in [int(x) for x in os.environ.get("BENCH_FROZEN_LEASE", "").split(",") if x]:
        try:
            frozen.append(frozen_failover(sizes[0], lease, say))
        except Exception as exc:
            say(f"    frozen run failed: {exc!r}"[:2000])
            failed.append({"nodes": sizes[0], "lease": lease, "error": repr(exc)[:4000]})
    available, why = daemon_available()
    daemon: dict[int, dict[str, Any]] = {}
    for size in sizes:
        if not available:
            daemon[size] = {"error": why}
        elif daemon_seconds <= 0:
            daemon[size] = {"error": "skipped (BENCH_DAEMON_SECONDS=0)"}
        else:
            try:
                daemon[size] = measure_daemon(size, daemon_seconds, say)
            except Exception as exc:
                daemon[size] = {"error": f"daemon run failed: {exc!r}"[:300]}
    period = next((str(d["period_s"]) for d in daemon.values() if "period_s" in d), "")
    table = markdown(runs, daemon, period) + (f"\n\n{frozen_table(frozen)}" if frozen else "")
    more: list[dict[str, Any]] = []
    if "addresses" in _parts():
        more, more_failed = addresses.measure(say)
        failed += more_failed
        if more:
            table += f"\n\n{addresses.table(more)}"
    meta["loadavg_end"] = os.getloadavg()
    meta["installed_digest_end"] = installed_digest()
    if meta["installed_digest_end"] != meta["installed_digest_start"]:
        say("WARNING: the installed repmgr-vip changed during the run; figures mix versions")
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    header = (f"Measured {meta['date']} on {meta['nproc']} CPUs ({meta['cpu']}), kernel "
              f"{meta['kernel']}, {meta['postgresql']}, {meta['repmgr']}, "
              f"{meta['repmgr_vip']} ({meta['measured_version']}); load average at start "
              f"{meta['loadavg_start'][0]:.2f}, at the end {meta['loadavg_end'][0]:.2f}, "
              f"other labs running at start: {len(meta['other_labs_at_start'])}; took "
              f"{meta['wall_seconds']:.0f} s.")
    (RESULTS / "latest.json").write_text(json.dumps(
        {"meta": meta, "runs": runs, "failed": failed, "daemon": daemon, "frozen": frozen,
         "addresses": more,
         "table_markdown": table, "header": header}, indent=2, default=str) + "\n")
    (RESULTS / "latest.md").write_text(f"{header}\n\n{table}\n")
    say("")
    say(header)
    say("")
    say(table)
    say("")
    say(f"raw figures: {RESULTS / 'latest.json'}; table: {RESULTS / 'latest.md'}; "
        f"picture: {picture}")
    if failed:
        say(f"{len(failed)} run(s) failed; see 'failed' in latest.json")
    return 0 if all(runs.values()) else 1


def quiet() -> int:
    """BENCH_PARTS=quiet: the quiet daemons alone (the failover part ends with the same)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = machine()
    meta["measured_version"] = measured_version()
    seconds = float(os.environ.get("BENCH_DAEMON_SECONDS", "30")) or 30.0
    available, why = daemon_available()
    daemon: dict[int, dict[str, Any]] = {}
    for size in _sizes():
        if not available:
            daemon[size] = {"error": why}
            continue
        say(f"bench: quiet daemons at {size} nodes ({seconds:.0f} s window)")
        try:
            daemon[size] = measure_daemon(size, seconds, say)
        except Exception as exc:
            daemon[size] = {"error": f"daemon run failed: {exc!r}"[:300]}
    meta["loadavg_end"] = os.getloadavg()
    period = next((str(d["period_s"]) for d in daemon.values() if "period_s" in d), "")
    sizes = sorted(daemon)
    table = "\n".join([
        "| figure | " + " | ".join(f"{s} nodes" for s in sizes) + " | goal | met at "
        + " / ".join(str(s) for s in sizes) + " |",
        "|---|" + "---|" * len(sizes) + "---|---|",
        f"| **Daemon (`repmgr-vip daemon`, default settings, period {period} s)** |"
        + " |" * len(sizes) + " | |",
        *daemon_lines(daemon, sizes), "", f"11. {NOTES[11]}", f"12. {NOTES[12]}"])
    header = (f"Measured {meta['date']} on {meta['nproc']} CPUs ({meta['cpu']}), kernel "
              f"{meta['kernel']}, {meta['repmgr_vip']} ({meta['measured_version']}); load "
              f"average at start {meta['loadavg_start'][0]:.2f}, at the end "
              f"{meta['loadavg_end'][0]:.2f}, other labs running at start: "
              f"{len(meta['other_labs_at_start'])}.")
    (RESULTS / "quiet.json").write_text(json.dumps(
        {"meta": meta, "daemon": daemon, "header": header, "table_markdown": table},
        indent=2, default=str) + "\n")
    (RESULTS / "quiet.md").write_text(f"{header}\n\n{table}\n")
    say("")
    say(header)
    say("")
    say(table)
    return 0 if all("per_node" in d for d in daemon.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
