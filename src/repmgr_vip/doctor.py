"""`repmgr-vip check`: one line per prerequisite, so a DBA sees what is broken before a failover."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from repmgr_vip import cluster
from repmgr_vip.config import Config
from repmgr_vip.errors import VipError
from repmgr_vip.lease import lease_checks
from repmgr_vip.ndp import ipv6_checks
from repmgr_vip.network import VipNetwork, sudo_lines
from repmgr_vip.privileges import has_network_capabilities
from repmgr_vip.process import describe, first_line, run
from repmgr_vip.remote import run_remote


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    warning: bool = False

    def line(self) -> str:
        status = "ok  " if self.ok and not self.warning else ("WARN" if self.ok else "FAIL")
        return f"{status}  {self.name}: {self.detail}"


def _check_interface(network: VipNetwork) -> CheckResult:
    state = network.interface_state()
    name = f"interface {network.config.vip.interface}"
    if not state.exists:
        return CheckResult(name, False, "does not exist; fix vip.interface")
    if not state.up:
        return CheckResult(name, False, "is down (no carrier); bring the link up")
    holder = "holds the VIP" if network.holds() else "does not hold the VIP"
    return CheckResult(name, True, f"up, mac {state.mac}, {holder}")


def _check_binaries(config: Config, mode: str) -> Iterator[CheckResult]:
    needed = {"ip": config.commands.ip, "arping": config.commands.arping,
              "ssh": config.commands.ssh, "repmgr": config.repmgr.repmgr_binary}
    if mode == "sudo":
        needed["sudo"] = config.commands.sudo
    for name, path in needed.items():
        ok = os.path.isabs(path) and os.access(path, os.X_OK)
        detail = path if ok else f"{path} is not an executable file; install it or fix its path"
        yield CheckResult(f"binary {name}", ok, detail)


def _check_privileges(config: Config, mode: str) -> Iterator[CheckResult]:
    commands = sudo_lines(config)
    if mode == "direct":
        ok = os.geteuid() == 0 or has_network_capabilities()
        detail = ("running with CAP_NET_ADMIN and CAP_NET_RAW" if ok else
                  "no CAP_NET_ADMIN/CAP_NET_RAW; use privileges.mode='sudo' or grant them")
        yield CheckResult("privileges (direct)", ok, detail)
        return
    for argv in commands:
        result = run([config.commands.sudo, "-n", "-l", *argv], timeout=10)
        ok = result.returncode == 0
        detail = describe(argv) if ok else (
            f"`sudo -n {describe(argv)}` is not allowed "
            f"({first_line(result.stderr) or 'denied'}); "
            "install the rules from `repmgr-vip sudoers`")
        yield CheckResult("sudo rule", ok, detail)


def _check_state_dir(config: Config) -> CheckResult:
    ok = os.access(config.state_dir, os.W_OK | os.X_OK)
    detail = str(config.state_dir) if ok else (
        f"{config.state_dir} is not writable by this user; set state_dir")
    return CheckResult("state_dir", ok, detail)


def _check_cluster(config: Config) -> Iterator[CheckResult]:
    view = cluster.local_view(config)
    if not view.reachable:
        yield CheckResult("local PostgreSQL", False,
                          f"not reachable through {config.repmgr.path} conninfo: {view.error}")
        return
    role = "standby (in recovery)" if view.in_recovery else "primary"
    yield CheckResult("local PostgreSQL", True, f"{role}, timeline {view.timeline}")
    try:
        nodes = cluster.registered_nodes(config)
    except VipError as exc:
        yield CheckResult("repmgr metadata", False, str(exc))
        return
    others = [n for n in nodes if n.node_id != config.repmgr.node_id and n.active]
    if config.repmgr.node_id not in {n.node_id for n in nodes}:
        yield CheckResult("repmgr metadata", False,
                          f"node {config.repmgr.node_id} is not registered; register it")
    yield from _check_ssh(config, others)


def _check_ssh(config: Config, nodes: list[cluster.NodeRecord]) -> Iterator[CheckResult]:
    def attempt(node: cluster.NodeRecord) -> CheckResult:
        name = f"ssh {node.node_name}"
        if not node.host:
            return CheckResult(name, False, "no host= in its conninfo; cannot reach it by SSH")
        result = run_remote(config, node.host, ["true"])
        if result.ok:
            return CheckResult(name, True, f"{node.host} (BatchMode) works")
        return CheckResult(name, False, f"{node.host}: {first_line(result.stderr) or 'failed'}; "
                           "set up passwordless SSH for this user")

    if not nodes:
        return
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        yield from pool.map(attempt, nodes)


def _check_isolation_grace(config: Config) -> CheckResult:
    from repmgr_vip.daemon import effective_isolation_grace

    grace = effective_isolation_grace(config)
    detection = config.repmgr.reconnect_attempts * config.repmgr.reconnect_interval
    detail = (f"{grace:g} s; repmgr detects a failed primary after {detection} s "
              "(reconnect_attempts x reconnect_interval)")
    if grace >= detection:
        return CheckResult("isolation grace", True, detail + ": an isolated primary may still "
                           "hold the VIP when the new one takes it; make it shorter", warning=True)
    return CheckResult("isolation grace", True, detail)


def run_checks(config: Config, network: VipNetwork) -> Iterator[CheckResult]:
    yield CheckResult("config", True, f"{config.path} (VIP {config.vip.cidr} on "
                      f"{config.vip.interface}, node {config.repmgr.node_id} "
                      f"{config.repmgr.node_name})")
    checks: list[tuple[str, Callable[[], Iterator[CheckResult]]]] = [
        ("interface", lambda: iter([_check_interface(network)])),
        ("binaries", lambda: _check_binaries(config, network.mode)),
        ("privileges", lambda: _check_privileges(config, network.mode)),
        ("state_dir", lambda: iter([_check_state_dir(config)])),
        ("isolation grace", lambda: iter([_check_isolation_grace(config)])),
        ("cluster", lambda: _check_cluster(config)),
        ("lease", lambda: lease_checks(config)),
        ("ipv6", lambda: ipv6_checks(config.vip.interface, network.mode, [
            a.with_prefixlen for a in config.vip.all if a.version == 6])),
    ]
    for name, check in checks:
        try:
            yield from check()
        except VipError as exc:
            yield CheckResult(name, False, str(exc))
