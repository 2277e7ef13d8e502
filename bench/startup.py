"""Start-up cost of the hook command, measured inside a lab node as the postgres user.

Every hook is a fresh `repmgr-vip` process started by repmgr(d), so interpreter start and
imports are paid on each failover. This prints one JSON object: wall times of
`repmgr-vip --help` and `python -c pass` (the floor), and the import time of the modules the
promote hook loads (`python -X importtime`), psycopg included. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

HOOK_MODULES = "import repmgr_vip.cli.main, repmgr_vip.app.hooks"  # the full CLI's promote
QUICK_MODULES = "import repmgr_vip.cli.quick"  # the generated promote line's quick start


def _wall(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return times


def _import_times(python: str, statement: str) -> dict[str, float]:
    """Cumulative import seconds of each top-level module the statement imports."""
    result = subprocess.run([python, "-X", "importtime", "-c", statement],
                            capture_output=True, text=True, check=True)
    top: dict[str, float] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        fields = line.split("|")
        name = fields[2]
        cumulative = fields[1].strip()
        if not cumulative.isdigit() or name[1:2] == " ":  # header line or a nested import
            continue
        top[name.strip()] = top.get(name.strip(), 0.0) + int(cumulative) / 1e6
    return top


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", required=True, help="path of the repmgr-vip script")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    python = sys.executable
    _wall([args.command, "--help"], 2)  # warm the page cache, as on a running server
    help_times = _wall([args.command, "--help"], args.runs)
    bare = _wall([python, "-c", "pass"], args.runs)
    imports = _import_times(python, HOOK_MODULES)
    ours = sum(v for k, v in imports.items() if k.startswith("repmgr_vip"))
    heaviest = sorted(imports.items(), key=lambda kv: kv[1], reverse=True)[:5]
    quick = _import_times(python, QUICK_MODULES)
    psycopg = _import_times(python, "import psycopg")
    print(json.dumps({
        "help_s": help_times,
        "help_median_s": statistics.median(help_times),
        "python_pass_median_s": statistics.median(bare),
        "hook_imports_s": sum(imports.values()),
        "quick_imports_s": sum(quick.values()),
        "repmgr_vip_modules_s": ours,
        "psycopg_import_s": sum(psycopg.values()),
        "heaviest_imports": heaviest,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
