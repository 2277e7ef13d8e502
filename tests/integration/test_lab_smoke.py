"""Proves the namespace lab itself, so VIP test failures can be trusted to be real.

Needs root, PostgreSQL 15 + repmgr, sshd, arping (skipped otherwise, failed on CI).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab import (
    IP_BIN,
    PG_BIN,
    VIP,
    CommandError,
    Lab,
    VipSampler,
    cleanup,
    fresh_prefix,
    list_netns,
    sudoers_file_for,
)

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]


def _add_vip(lab: Lab, name: str) -> None:
    """Put the VIP on a node as root (what repmgr-vip will do via sudo)."""
    lab.run(lab.node(name), [IP_BIN, "addr", "add", VIP, "dev", "eth0"], user="root")


def _del_vip(lab: Lab, name: str) -> None:
    """Remove the VIP if present."""
    lab.run(lab.node(name), [IP_BIN, "addr", "del", VIP, "dev", "eth0"], user="root", check=False)


def _run_lab_processes(workdir: Path) -> list[str]:
    """Processes whose command line mentions the run's workdir (should be none after down)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if str(workdir) in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_three_nodes_node1_primary_and_streaming(lab: Lab) -> None:
    assert [n.name for n in lab.nodes] == ["node1", "node2", "node3"]
    assert [n.ip for n in lab.nodes] == ["192.0.2.11", "192.0.2.12", "192.0.2.13"]
    n1, n2, n3 = lab.nodes
    assert lab.primary() == n1
    assert lab.is_in_recovery(n1) is False
    assert lab.is_in_recovery(n2) is True
    assert lab.is_in_recovery(n3) is True
    rows = lab.psql(
        n1, "SELECT application_name, state FROM pg_stat_replication ORDER BY 1", dbname="postgres"
    )
    assert rows.splitlines() == ["node2|streaming", "node3|streaming"]
    assert lab.psql(n2, "SELECT status FROM pg_stat_wal_receiver") == "streaming"
    assert lab.timings["up"] < 20, lab.timings


def test_cluster_show_csv_lists_three_nodes(lab: Lab) -> None:
    res = lab.repmgr(lab.nodes[0], "cluster", "show", "--csv")
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 3, res.stdout
    # node_id,connection_status,recovery_type: all reachable, node1 not in recovery
    assert lab.cluster_show() == [(1, 0, 0), (2, 0, 1), (3, 0, 1)]


def test_ssh_between_nodes_as_postgres(lab: Lab) -> None:
    for a in lab.nodes:
        for b in lab.nodes:
            if a is b:
                continue
            res = lab.ssh(a, b, "id -un")
            assert res.stdout.strip() == "postgres"
    # repmgr's remote calls: absolute repmgr_bindir path, the remote node's config.
    n1, _, n3 = lab.nodes
    res = lab.ssh(n1, n3, f"{PG_BIN}/repmgr -f {n3.repmgr_conf} node check --role")
    assert "OK" in res.stdout
    # and the ssh really lands in the other namespace
    res = lab.ssh(n1, n3, f"{IP_BIN} -4 -o addr show dev eth0")
    assert n3.ip in res.stdout and n1.ip not in res.stdout


def test_lab_does_not_add_the_vip(lab: Lab) -> None:
    assert lab.vip_holders() == []
    for n in lab.nodes:
        assert lab.addresses(n) == [f"{n.ip}/24"]
        assert lab.has_carrier(n)


def test_client_arping_gets_node_mac(lab: Lab) -> None:
    for n in lab.nodes:
        assert lab.client_arping(n.ip) == [n.mac]
    assert lab.client_arping("192.0.2.99", timeout=0.5) == []
    n1 = lab.nodes[0]
    res = lab.client_psql("SELECT pg_is_in_recovery()", host=n1.ip)
    assert res.stdout.strip() == "f"
    assert lab.client_neigh_mac(n1.ip) == n1.mac


def test_vip_holders_and_sampler_catch_a_double_vip(lab: Lab) -> None:
    n2, n3 = lab.node("node2"), lab.node(3)
    try:
        with VipSampler(lab) as sampler:
            _add_vip(lab, "node2")
            lab.wait_for(lambda: sampler.last == ("node2",), 2, what="sampler sees node2")
            assert lab.client_arping() == [n2.mac]
            _add_vip(lab, "node3")
            lab.wait_for(lambda: sampler.max_holders == 2, 2, what="sampler sees two")
            assert sorted(lab.client_arping(count=2)) == sorted([n2.mac, n3.mac])
            lab.link_down(n3)  # a node cut off the wire cannot collide
            lab.wait_for(lambda: lab.vip_holders() == ["node2"], 2, what="node3 unplugged")
            time.sleep(0.2)
        assert sampler.last == ("node2",)
        assert len(sampler.samples) >= 5
        with pytest.raises(AssertionError, match=r"node2.*node3"):
            sampler.assert_never_two()
    finally:
        lab.link_up(n3)
        _del_vip(lab, "node2")
        _del_vip(lab, "node3")
    assert lab.vip_holders() == []
    with VipSampler(lab) as quiet:
        time.sleep(0.2)
    quiet.assert_never_two()
    assert quiet.max_holders == 0


def test_link_down_and_up(lab: Lab) -> None:
    n1, n3 = lab.node("node1"), lab.node("node3")
    lab.link_down(n3)
    try:
        lab.wait_for(lambda: not lab.has_carrier(n3), 2, what="node3 loses carrier")
        assert lab.client_arping(n3.ip, timeout=0.5) == []
        res = lab.ssh(n1, n3, "true", check=False, timeout=10)
        assert res.returncode != 0
    finally:
        lab.link_up(n3)
    lab.wait_for(lambda: lab.has_carrier(n3), 2, what="node3 carrier back")
    assert lab.client_arping(n3.ip) == [n3.mac]
    lab.wait_for(lambda: lab.streaming_count(n1) == 2, 30, what="node3 streams again")


def test_freeze_and_thaw(lab: Lab) -> None:
    n1, n3 = lab.node("node1"), lab.node("node3")
    frozen = lab.freeze(n3)
    try:
        assert frozen
        assert all(
            Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[-1].split()[0] in "TZ"
            for p in frozen
            if Path(f"/proc/{p}").exists()
        )
        assert lab.is_in_recovery(n3) is None  # postgres does not answer
        assert lab.client_arping(n3.ip) == [n3.mac]  # but the kernel still does ARP
        assert lab.ssh(n1, n3, "true", check=False, timeout=15).returncode != 0
    finally:
        lab.thaw(n3)
    lab.wait_for(lambda: lab.is_in_recovery(n3) is True, 10, what="node3 answers")
    assert lab.ssh(n1, n3, "true").returncode == 0


def test_stop_start_and_kill_postgres(lab: Lab) -> None:
    n1, n3 = lab.node("node1"), lab.node("node3")
    lab.stop_postgres(n3)
    assert lab.is_in_recovery(n3) is None
    lab.start_postgres(n3)
    assert lab.is_in_recovery(n3) is True
    pid = lab.postmaster_pid(n3)
    assert pid is not None
    lab.kill_postgres(n3)
    assert lab.postmaster_pid(n3) is None
    assert lab.is_in_recovery(n3) is None
    lab.start_postgres(n3)  # restart after kill -9 works
    assert lab.is_in_recovery(n3) is True
    lab.wait_for(lambda: lab.streaming_count(n1) == 2, 30, what="node3 streams again")


def test_repmgrd_start_and_stop(lab: Lab) -> None:
    n2 = lab.node("node2")
    pid = lab.start_repmgrd(n2)
    try:
        assert lab.repmgrd_pid(n2) == pid
        lab.wait_for(
            lambda: (
                "monitoring connection to upstream node"
                in n2.repmgr_log.read_text(errors="replace")
            ),
            10,
            what="repmgrd monitoring",
        )
        res = lab.repmgr(n2, "service", "status", "--csv", check=False)
        assert re.search(r"^2,node2,standby,1,1,\d+,", res.stdout, re.MULTILINE), res.stdout
    finally:
        lab.stop_repmgrd(n2)
    assert lab.repmgrd_pid(n2) is None


def test_append_and_set_repmgr_conf(lab: Lab) -> None:
    n3 = lab.node("node3")
    before = n3.repmgr_conf.read_text()
    try:
        lab.append_repmgr_conf(n3, "# appended by test\nlog_level='DEBUG'")
        assert n3.repmgr_conf.read_text().endswith("log_level='DEBUG'\n")
        lab.set_repmgr_conf(n3, "log_level", "INFO")
        text = n3.repmgr_conf.read_text()
        assert text.count("log_level=") == 1 and "log_level='INFO'" in text
        res = lab.repmgr(n3, "node", "check", "--role")
        assert "OK" in res.stdout
    finally:
        n3.repmgr_conf.write_text(before)


def test_install_sudoers(lab: Lab) -> None:
    path = lab.install_sudoers("postgres ALL=(root) NOPASSWD: /usr/bin/ip\n")
    assert path == sudoers_file_for(lab.prefix)
    assert stat.S_IMODE(path.stat().st_mode) == 0o440
    n2 = lab.node("node2")
    res = lab.run(n2, ["sudo", "-n", "/usr/bin/ip", "-4", "addr", "show", "dev", "eth0"])
    assert n2.ip in res.stdout
    with pytest.raises(CommandError):
        lab.install_sudoers("this is not sudoers syntax = =\n")
    assert path.exists()  # the valid file is left alone


def test_witness_cluster(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=2, witness=True)
    assert lab.witness is not None
    assert lab.node("witness") is lab.witness
    assert lab.cluster_show() == [(1, 0, 0), (2, 0, 1), (99, 0, 0)]
    out = lab.repmgr(lab.nodes[0], "cluster", "show").stdout
    assert re.search(r"witness\s*\|\s*witness", out), out
    assert lab.primary() == lab.nodes[0]  # the witness is never taken for a primary
    assert lab.ssh(lab.witness, lab.nodes[1], "true").returncode == 0


def test_teardown_leaves_nothing(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=1, witness=True)
    sudoers = lab.install_sudoers("postgres ALL=(root) NOPASSWD: /usr/bin/arping\n")
    assert lab.is_in_recovery(lab.nodes[0]) is False
    assert _run_lab_processes(lab.workdir)
    t0 = time.monotonic()
    lab.down()
    took = time.monotonic() - t0
    assert not [ns for ns in list_netns() if ns.startswith(f"{lab.prefix}-")]
    assert not lab.workdir.exists()
    assert not sudoers.exists()
    assert _run_lab_processes(lab.workdir) == []
    lab.down()  # idempotent
    assert took < 10


def test_cli_up_list_down_by_prefix() -> None:
    """The CLI runs under Debian's python3 too (stdlib only) and cleans a run by prefix."""
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    prefix = fresh_prefix()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "-m", "lab", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )

    try:
        out = cli("up", "--nodes", "2", "--no-cluster", "--prefix", prefix).stdout
        assert f"prefix:  {prefix}" in out
        assert f"{prefix}-n2" in list_netns()
        assert prefix in cli("list").stdout
        # a crashed run: nothing but the prefix is known
        cli("down", "--prefix", prefix)
        assert not [ns for ns in list_netns() if ns.startswith(f"{prefix}-")]
        assert not Path(f"/tmp/rvlab-{prefix}").exists()
        cli("down", "--prefix", prefix)  # idempotent
    finally:
        cleanup(prefix)


def test_switchover_failover_and_rewind(lab_factory: Callable[..., Lab]) -> None:
    """What VIP scenarios need from the lab: ssh switchover, promote, pg_rewind rejoin."""
    lab = lab_factory(nodes=2)
    n1, n2 = lab.nodes
    assert lab.timeline(n1) == 1
    res = lab.repmgr(n2, "standby", "switchover", "--siblings-follow", timeout=120)
    assert "switchover was successful" in res.stdout + res.stderr
    assert lab.primary() == n2
    lab.wait_for(lambda: lab.streaming_count(n2) == 1, 30, what="node1 follows node2")
    assert lab.timeline(n2) == 2
    # crash the new primary, promote node1 by hand, rewind node2 back in
    lab.kill_postgres(n2)
    lab.repmgr(n1, "standby", "promote")
    assert lab.primary() == n1
    assert lab.timeline(n1) == 3  # immediately, not only after a checkpoint
    lab.psql(n1, "CREATE TABLE lab_smoke(x int); INSERT INTO lab_smoke VALUES (1)")
    lab.repmgr(n2, "node", "rejoin", "-d", n1.conninfo, "--force-rewind", timeout=120)
    lab.wait_for(lambda: lab.streaming_count(n1) == 1, 30, what="node2 streams")
    # pg_rewind copies the data directory: node settings must survive it
    assert lab.psql(n2, "SHOW cluster_name", dbname="postgres") == n2.name
    lab.wait_for(lambda: lab.psql(n2, "SELECT count(*) FROM lab_smoke") == "1", 10)
    assert lab.timeline(n2) == 3
    # switchover left repmgr's hard-coded /tmp/node-rejoin.*.log; down() removes it
    lab.down()
    leftovers = [
        p for p in Path("/tmp").glob("node-rejoin.*.log") if str(lab.workdir) in p.read_text()
    ]
    assert leftovers == []
