"""CPU per interface read: `ip -j address show` (fork+exec) against rtnetlink in-process.

The daemon reads its interface several times a period (the cycle, the lease, the replica
thread), so this is the part of its CPU that grows with nothing but time. Reads `lo` of the
namespace it runs in; sends nothing on any network. `python -m bench.ifread [N]`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from repmgr_vip.adapters import network, rtnl
from repmgr_vip.config.schema import load_config


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _per_read_ms(read: object, count: int) -> tuple[float, float]:
    """(CPU ms per read, wall ms per read), this process and its children."""
    assert callable(read)
    cpu, wall = _cpu(), time.monotonic()
    for _ in range(count):
        read()
    return (_cpu() - cpu) * 1000 / count, (time.monotonic() - wall) * 1000 / count


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "repmgr.conf"
        conf.write_text(f"node_id=1\nnode_name='n1'\nconninfo='host=n1'\ndata_directory='{tmp}'\n")
        toml = Path(tmp) / "vip.toml"
        toml.write_text(f'repmgr_config = "{conf}"\nstate_dir = "{tmp}"\n'
                        '[vip]\naddress = "192.0.2.115/24"\ninterface = "lo"\n')
        vip = network.VipNetwork(load_config(toml, check_host=False))
        rounds = {"ip": [], "netlink": []}  # type: dict[str, list[tuple[float, float]]]
        for _ in range(3):  # interleaved, so a load change hits both
            rounds["ip"].append(_per_read_ms(lambda: vip._interface_state_from_ip("lo", True),
                                             count))
            rounds["netlink"].append(_per_read_ms(lambda: rtnl.read_interface("lo", ipv6=False),
                                                  count))
    result = {name: {"cpu_ms": statistics.median(c for c, _ in r),
                     "wall_ms": statistics.median(w for _, w in r)} for name, r in rounds.items()}
    result["load_average"] = {"start_1min": os.getloadavg()[0]}
    print(json.dumps(result, indent=2))
    for name in ("ip", "netlink"):
        print(f"{name:8s} {result[name]['cpu_ms']:.3f} ms CPU, {result[name]['wall_ms']:.3f} ms "
              f"wall per read (median of 3 rounds of {count})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
