"""Network-namespace lab for repmgr-vip: a real repmgr cluster per run (tests, bench, demo).

Split by job: settings (names, Node, errors), procs (commands in namespaces, killing for
sure), netns (run prefixes, work directories, cleanup), prereq (programs and their Debian
packages), cluster (the Lab: network, sshd, PostgreSQL, repmgr), faults (kill, stop, cut,
freeze), observe (rtnetlink reader, VIP sampler). Standard library only, so that
`python3 -m lab` works with Debian's python3.
"""

from lab.cluster import Lab
from lab.netns import cleanup, fresh_prefix, list_runs, sudoers_file_for, workdir_for
from lab.observe import VipSampler
from lab.prereq import missing_prerequisites
from lab.procs import list_netns, run_cmd
from lab.settings import (
    CLIENT_IP,
    INTERFACE,
    IP_BIN,
    MOUNT,
    PG_BIN,
    PG_USER,
    UMOUNT,
    VIP,
    VIP6,
    VIP6_IP,
    VIP_IP,
    WITNESS_IP,
    CommandError,
    LabError,
    Node,
)

__all__ = [
    "CLIENT_IP", "INTERFACE", "IP_BIN", "MOUNT", "PG_BIN", "PG_USER", "UMOUNT", "VIP", "VIP6",
    "VIP6_IP", "VIP_IP", "WITNESS_IP", "CommandError", "Lab", "LabError", "Node", "VipSampler",
    "cleanup", "fresh_prefix", "list_netns", "list_runs", "missing_prerequisites", "run_cmd",
    "sudoers_file_for", "workdir_for",
]
