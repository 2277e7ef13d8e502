"""Hardening in the lab: a root run never locks the postgres hooks out.

A DBA who runs `repmgr-vip release` as root (umask 077) before postgres ever took the lock
used to leave a root-owned 0600 lock file; every later hook then failed and a failover never
moved the VIP.
"""

from __future__ import annotations

import os
import pwd
import stat
import time
from collections.abc import Callable

import pytest

from lab import PG_USER, VIP_IP, Lab, Node, VipSampler
from tests.integration.vipconf import (
    REPMGR_VIP,
    config_path,
    hooked_cluster,
    journal_entries,
    vip,
)

pytestmark = pytest.mark.lab

FAILOVER_TIMEOUT = 60.0


def _root_release_with_umask_077(lab: Lab, node: Node) -> None:
    result = lab.run(node, ["/bin/sh", "-c", 'umask 077; exec "$0" -c "$1" release',
                            REPMGR_VIP, str(config_path(node))], user="root", check=False)
    assert result.returncode == 0, result.stderr


def _lock_file(node: Node) -> os.stat_result:
    return (node.dir / "repmgr-vip.lock").stat()


def test_root_release_with_umask_077_leaves_a_lock_postgres_can_take(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=3)
    hooked_cluster(lab, start=False)
    postgres_uid = pwd.getpwnam(PG_USER).pw_uid
    for node in lab.nodes:
        _root_release_with_umask_077(lab, node)
    node1, node2, node3 = lab.nodes
    # manual commands as postgres take the lock
    for node in (node2, node3):
        result = vip(lab, node, "release")
        assert result.returncode == 0, result.stderr
    with VipSampler(lab) as sampler:
        # the hooks as postgres take it too: repmgrd's start hook puts the VIP on the primary
        for node in lab.nodes:
            started = lab.repmgr(node, "daemon", "start", check=False, timeout=60)
            assert started.returncode == 0, started.stdout + started.stderr
        assert lab.vip_holders() == [node1.name]
        # and a failover moves the VIP: promote_command ran as postgres on node2
        lab.kill_postgres(node1)
        lab.wait_for(lambda: lab.is_in_recovery(node2) is False, FAILOVER_TIMEOUT,
                     interval=0.05, what="node2 promoted")
        lab.wait_for(lambda: lab.vip_holders() == [node2.name], 20, interval=0.05,
                     what="VIP on node2")
        time.sleep(1)
        assert lab.vip_holders() == [node2.name]
    sampler.assert_never_two()
    # journaled once the standbys asked after the promotion confirmed (SETTLE_WAIT, 2 s)
    lab.wait_for(lambda: bool(journal_entries(node2, action="acquire", outcome="held")), 5,
                 interval=0.1, what="node2 journals the VIP as held")
    assert VIP_IP not in " ".join(lab.addresses(node1))
    for node in lab.nodes:
        info = _lock_file(node)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (postgres_uid, 0o644), node.name
