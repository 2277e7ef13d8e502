"""Network-namespace test lab for repmgr-vip: a real repmgr cluster per test run.

Standard library only, so `python3 -m tests.lab` works with Debian's python3.
"""

from tests.lab.lab import (
    CLIENT_IP,
    INTERFACE,
    PG_BIN,
    VIP,
    VIP_IP,
    WITNESS_IP,
    CommandError,
    Lab,
    LabError,
    Node,
    VipSampler,
    cleanup,
    fresh_prefix,
    list_runs,
    missing_prerequisites,
)

__all__ = [
    "CLIENT_IP",
    "INTERFACE",
    "PG_BIN",
    "VIP",
    "VIP_IP",
    "WITNESS_IP",
    "CommandError",
    "Lab",
    "LabError",
    "Node",
    "VipSampler",
    "cleanup",
    "fresh_prefix",
    "list_runs",
    "missing_prerequisites",
]
