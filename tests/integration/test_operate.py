"""Operating the daemon as a DBA does: reload with SIGHUP, `check` and `check --all`.

One 3-node lab with the hooks wired, repmgrd started the repmgr way and the daemon running on
every node, as the installed command (RV_UNDER_TEST, the Debian package under `make test`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from lab import Lab, Node
from tests.integration.vipconf import (
    config_path,
    hooked_cluster,
    metrics,
    start_daemon,
    stop_daemon,
    vip,
    vip_log,
    write_vip_config,
)

pytestmark = pytest.mark.lab

ANNOUNCES = re.compile(r'^repmgr_vip_actions_total\{action="announce"\} (\S+)$', re.M)


class Daemons:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, node: Node) -> None:
        state = node.dir / "repmgr-vip-daemon.json"
        state.unlink(missing_ok=True)
        self.procs[node.name] = start_daemon(self.lab, node)
        self.lab.wait_for(state.exists, 30, what=f"{node.name}'s daemon ran a cycle")

    def stop(self, node: Node) -> None:
        proc = self.procs.pop(node.name, None)
        if proc is not None and proc.poll() is None:
            stop_daemon(proc)

    def pid(self, node: Node) -> int:
        state = json.loads((node.dir / "repmgr-vip-daemon.json").read_text())
        return int(state["pid"])


@pytest.fixture(scope="module")
def daemons(lab: Lab) -> Iterator[Daemons]:
    hooked_cluster(lab)
    running = Daemons(lab)
    for node in lab.nodes:
        running.start(node)
    lab.wait_for(lambda: lab.vip_holders() == ["node1"], 15, what="VIP on node1")
    yield running
    for node in lab.nodes:
        running.stop(node)


def _announces(lab: Lab, node: Node) -> float:
    found = ANNOUNCES.search(metrics(lab, node))
    return float(found.group(1)) if found else 0.0


def _errors_logged(node: Node) -> int:
    return sum(" ERROR " in line for line in vip_log(node).splitlines())


def test_sighup_applies_a_valid_change_and_keeps_running_on_an_invalid_one(
        lab: Lab, daemons: Daemons) -> None:
    node1 = lab.nodes[0]
    pid = daemons.pid(node1)
    before = _announces(lab, node1)
    time.sleep(3)
    assert _announces(lab, node1) == before  # reannounce_interval = 0: no periodic ARP
    try:
        write_vip_config(lab, node1, "[daemon]\nreannounce_interval = 0.5\n")
        os.kill(pid, signal.SIGHUP)
        lab.wait_for(lambda: _announces(lab, node1) >= before + 3, 10,
                     what="periodic gratuitous ARP after the reload")
        # An invalid file: refused in one log line; the daemon goes on with what it had.
        errors = _errors_logged(node1)
        config_path(node1).write_text(config_path(node1).read_text()
                                      + "[daemon]\ninterval = -1\n")
        os.kill(pid, signal.SIGHUP)
        lab.wait_for(lambda: _errors_logged(node1) > errors, 10, what="the refusal logged")
        counted = _announces(lab, node1)
        time.sleep(4.5)
        assert daemons.procs["node1"].poll() is None
        assert daemons.pid(node1) == pid
        # still announcing as reloaded, not back to the original 0 (no periodic ARP)
        assert _announces(lab, node1) >= counted + 1
        assert _errors_logged(node1) == errors + 1
        assert lab.vip_holders() == ["node1"]
    finally:
        write_vip_config(lab, node1)
        os.kill(pid, signal.SIGHUP)


def _lines(output: str, status: str) -> list[str]:
    return [line for line in output.splitlines() if f"  {status}  " in f"  {line}"]


def test_check_passes_on_a_fully_wired_node(lab: Lab, daemons: Daemons) -> None:
    result = vip(lab, lab.nodes[1], "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not _lines(result.stdout, "FAIL") and not _lines(result.stdout, "WARN"), result.stdout
    for node in lab.nodes:
        assert f"daemon on {node.name}: running" in result.stdout
    assert "repmgr.conf promote_command" in result.stdout


def test_check_all_names_each_node_and_what_is_unprotected(lab: Lab, daemons: Daemons) -> None:
    node2, node3 = lab.nodes[1], lab.nodes[2]
    daemons.stop(node3)
    conf = node3.repmgr_conf.read_text()
    try:
        result = vip(lab, node2, "check", "--all", timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
        rows = [line.split(None, 2) for line in result.stdout.splitlines()[:-1]]
        assert {r[0] for r in rows} == {"node1", "node2", "node3"}, result.stdout
        for node in lab.nodes:  # every node sees node3's daemon missing, and says so
            warned = [r for r in rows if r[0] == node.name and r[1] == "WARN"
                      and "daemon on node3" in r[2]]
            assert warned, result.stdout
        assert not [r for r in rows if r[1] == "FAIL"], result.stdout
        # A missing promote_command on node3: a FAIL line for node3, exit 1, from any node.
        node3.repmgr_conf.write_text("\n".join(
            line for line in conf.splitlines() if not line.startswith("promote_command")) + "\n")
        result = vip(lab, lab.nodes[0], "check", "--all", timeout=180)
        assert result.returncode == 1, result.stdout + result.stderr
        failing = [line.split(None, 2) for line in result.stdout.splitlines()
                   if line.split()[1:2] == ["FAIL"]]
        assert failing and all(f[0] == "node3" and "promote_command" in f[2] for f in failing), \
            result.stdout
    finally:
        node3.repmgr_conf.write_text(conf)
        daemons.start(node3)


def test_check_fails_a_vip_outside_the_interface_subnet(lab: Lab, daemons: Daemons) -> None:
    node2 = lab.nodes[1]
    other = node2.dir / "other-subnet.toml"
    other.write_text(config_path(node2).read_text().replace("192.0.2.115/24", "198.51.100.115/24"))
    other.chmod(0o644)
    result = vip(lab, node2, "check", config=other)
    assert result.returncode == 1
    assert [line for line in _lines(result.stdout, "FAIL") if "VIP subnet" in line], result.stdout
