"""Command line for the lab: build a cluster to poke at by hand, or clean up a crashed run.

python3 -m lab up [--nodes N] [--witness] [--prefix P] [--no-cluster]
python3 -m lab down --prefix P [--prefix Q ...]
python3 -m lab list
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from lab import Lab, LabError, cleanup, list_runs, workdir_for


def _cmd_up(args: argparse.Namespace) -> int:
    """Build a lab and leave it running (no teardown on exit)."""
    lab = Lab(
        nodes=args.nodes, prefix=args.prefix, witness=args.witness, cluster=not args.no_cluster
    )
    t0 = time.monotonic()
    try:
        lab.up()
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"prefix:  {lab.prefix}")
    print(f"workdir: {lab.workdir}")
    print(f"up in {time.monotonic() - t0:.2f}s  steps: {lab.timings}")
    print(lab.node_table())
    first = lab.nodes[0]
    print("\ntry:")
    print(
        f"  ip netns exec {first.netns} runuser -u postgres -- "
        f"/usr/lib/postgresql/15/bin/repmgr -f {first.repmgr_conf} cluster show"
    )
    print(f"  python3 -m lab down --prefix {lab.prefix}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    """Clean one or more runs by prefix (idempotent)."""
    rc = 0
    for prefix in args.prefix:
        t0 = time.monotonic()
        try:
            cleanup(prefix)
        except (LabError, ValueError) as exc:
            print(f"error: {prefix}: {exc}", file=sys.stderr)
            rc = 1
            continue
        print(f"{prefix}: down in {time.monotonic() - t0:.2f}s")
    return rc


def _cmd_list(_args: argparse.Namespace) -> int:
    """Show runs that still have namespaces or a workdir."""
    runs = list_runs()
    if not runs:
        print("no lab runs")
    for prefix, namespaces in sorted(runs.items()):
        wd = workdir_for(prefix)
        print(
            f"{prefix}: namespaces={' '.join(sorted(namespaces)) or '-'} "
            f"workdir={wd if wd.exists() else '-'}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and dispatch."""
    parser = argparse.ArgumentParser(
        prog="python3 -m lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab and leave it running")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--witness", action="store_true")
    up.add_argument("--prefix", default=None, help="namespace prefix (default rv + 4 hex)")
    up.add_argument("--no-cluster", action="store_true", help="namespaces and sshd only")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", help="tear a run down by prefix")
    down.add_argument("--prefix", action="append", required=True)
    down.set_defaults(func=_cmd_down)
    lst = sub.add_parser("list", help="list runs with namespaces or workdirs")
    lst.set_defaults(func=_cmd_list)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s"
    )
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
