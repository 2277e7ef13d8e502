"""Start-up cost of the hook command, measured inside a lab node as the postgres user.

Every hook is a fresh `repmgr-vip` process started by repmgr(d), so interpreter start and
imports are paid on each failover. This prints one JSON object: wall times of
`repmgr-vip --help`, of the promote hook line against a daemon that answers at once, and
`python -c pass` (the floor), all with the command's own interpreter, and the import time
of the modules the promote hook loads (`python -X importtime`), psycopg included. Standard
library only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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


def interpreter(command: str) -> str:
    """The Python the command's #! line names (the Debian package's, or a venv's)."""
    with open(command, "rb") as script:
        first = script.readline().decode(errors="replace")
    words = first[2:].split() if first.startswith("#!") else []
    return words[0] if words else sys.executable


def _quick_hook(command: str, runs: int) -> list[float]:
    """Wall time of the real promote hook line (`-c CONFIG promote --control SOCKET`)
    against a stand-in daemon that greets and refuses at once (exit 0, no repmgr started):
    the interpreter's start, the quick start's imports, the connection and two lines."""
    directory = tempfile.mkdtemp(prefix="rvq")
    path = os.path.join(directory, "control.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b'{"hello": 1, "pid": 1}\n')
                conn.recv(65536)  # the promote request
                conn.sendall(b'{"ok": true, "exit": 0}\n')

    threading.Thread(target=answer, daemon=True).start()
    try:
        return _wall([command, "-c", "/nonexistent.toml", "promote", "--control", path], runs)
    finally:
        server.close()
        os.unlink(path)
        os.rmdir(directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", required=True, help="path of the repmgr-vip script")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    python = interpreter(args.command)
    _wall([args.command, "--help"], 2)  # warm the page cache, as on a running server
    help_times = _wall([args.command, "--help"], args.runs)
    quick_times = _quick_hook(args.command, args.runs)
    bare = _wall([python, "-c", "pass"], args.runs)
    imports = _import_times(python, HOOK_MODULES)
    ours = sum(v for k, v in imports.items() if k.startswith("repmgr_vip"))
    heaviest = sorted(imports.items(), key=lambda kv: kv[1], reverse=True)[:5]
    quick = _import_times(python, QUICK_MODULES)
    psycopg = _import_times(python, "import psycopg")
    print(json.dumps({
        "help_s": help_times,
        "help_median_s": statistics.median(help_times),
        "quick_hook_median_s": statistics.median(quick_times),
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
