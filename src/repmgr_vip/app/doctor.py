"""`repmgr-vip check`: one line per prerequisite, so a DBA sees what is broken before a failover."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repmgr_vip.adapters import cluster
from repmgr_vip.adapters.ndp import ipv6_checks
from repmgr_vip.adapters.network import VipNetwork, sudo_lines
from repmgr_vip.adapters.privileges import has_network_capabilities
from repmgr_vip.adapters.process import describe, first_line, run
from repmgr_vip.adapters.remote import remote_vip_command, run_remote
from repmgr_vip.app.lease import lease_checks
from repmgr_vip.config.repmgrconf import parse_repmgr_conf_text
from repmgr_vip.config.schema import Config, VipInterface
from repmgr_vip.core.errors import VipError
from repmgr_vip.core.model import CheckResult, NodeRecord


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


def _writable_by_others(path: Path) -> str | None:
    """Why someone other than root could change `path` or a directory above it, or None."""
    for where in [path, *path.parents]:
        try:
            st = os.stat(where)
        except OSError as exc:
            return f"{where}: {exc.strerror}"
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if st.st_uid != 0:
            return f"{where} is owned by uid {st.st_uid}, not root"
        if st.st_mode & 0o022 and not sticky_dir:
            return f"{where} is writable by group or others"
    return None


def _check_helper(config: Config) -> Iterator[CheckResult]:
    """Sudo mode: sudoers lets postgres run repmgr-vip itself as root (refuse-stale; with an
    IPv6 address nd-probe and nd-announce; exact arguments). That is safe only while nobody
    but root can change the program: the command, its interpreter and the installed package."""
    import repmgr_vip

    command = Path(config.remote.command)
    paths = [command, Path(repmgr_vip.__file__).resolve().parent]
    with contextlib.suppress(OSError):
        first = command.read_text(encoding="utf-8", errors="replace").splitlines()[0]
        if first.startswith("#!") and first[2:].split():
            paths.append(Path(first[2:].split()[0]).resolve())
    for path in paths:
        problem = _writable_by_others(path)
        if problem:
            yield CheckResult("root helper (sudo)", False, f"{problem}: the sudoers lines for "
                              f"`{command} refuse-stale/nd-probe/nd-announce` would let that "
                              "user become root; install repmgr-vip owned by root (the Debian "
                              "package)")
            return
    yield CheckResult("root helper (sudo)", True, f"{command} and its package are root's only")


def _check_privileges(config: Config, mode: str) -> Iterator[CheckResult]:
    commands = sudo_lines(config)
    if mode == "sudo":
        yield from _check_helper(config)
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


def _check_ssh(config: Config, nodes: list[NodeRecord]) -> Iterator[CheckResult]:
    def attempt(node: NodeRecord) -> CheckResult:
        name = f"ssh {node.node_name}"
        if not node.host:
            return CheckResult(name, False, "no host= in its conninfo; cannot reach it by SSH")
        result = run_remote(config, node.host, ["true"])
        if result.ok:
            return CheckResult(name, True, f"{node.host} (BatchMode) works")
        fix = ("set fencing.ssh_kex_first = \"\" (this ssh does not take it)"
               if "KexAlgorithms" in result.stderr else "set up passwordless SSH for this user")
        return CheckResult(name, False, f"{node.host}: {first_line(result.stderr) or 'failed'}; "
                           f"{fix}")

    if not nodes:
        return
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        yield from pool.map(attempt, nodes)


def _check_isolation_grace(config: Config) -> CheckResult:
    from repmgr_vip.app.daemon import effective_isolation_grace

    grace = effective_isolation_grace(config)
    detection = config.repmgr.reconnect_attempts * config.repmgr.reconnect_interval
    detail = (f"{grace:g} s; repmgr detects a failed primary after {detection} s "
              "(reconnect_attempts x reconnect_interval)")
    if grace >= detection:
        return CheckResult("isolation grace", True, detail + ": an isolated primary may still "
                           "hold the VIP when the new one takes it; make it shorter", warning=True)
    return CheckResult("isolation grace", True, detail)


# Hook lines without which a failover or switchover leaves the VIP behind: a FAIL. The others
# have alternatives (repmgrd under systemd, the daemon's own self-fencing): a WARN.
ESSENTIAL_HOOKS = ("promote_command", "follow_command", "event_notification_command")
WHAT_IS_LOST = {
    "repmgrd_service_start_command": "`repmgr daemon start` does not put the VIP on the primary "
                                     "(the daemon still does)",
    "repmgrd_service_stop_command": "`repmgr daemon stop` does not go through repmgr-vip",
    "child_nodes_disconnect_command": "a primary that loses its standbys is not fenced at once "
                                      "(the daemon's isolation grace still applies)",
}


def _check_hook_lines(config: Config) -> Iterator[CheckResult]:
    """repmgr.conf must carry what `repmgr-vip repmgr-conf` prints, or failover surprises."""
    from repmgr_vip.app.hooks import repmgr_conf_lines

    expected = parse_repmgr_conf_text(repmgr_conf_lines(config), "repmgr-conf")
    try:
        actual = parse_repmgr_conf_text(config.repmgr.path.read_text(encoding="utf-8"),
                                        str(config.repmgr.path))
    except OSError as exc:
        yield CheckResult("repmgr.conf hooks", False,
                          f"cannot read {config.repmgr.path} ({exc.strerror})")
        return
    fix = f"add the line from `repmgr-vip repmgr-conf` to {config.repmgr.path}, restart repmgrd"
    for key, want in expected.items():
        if key == "event_notifications":
            continue
        have = actual.get(key)
        name = f"repmgr.conf {key}"
        if have == want:
            yield CheckResult(name, True, "as `repmgr-vip repmgr-conf` prints it")
            continue
        problem = "missing" if not have else "differs from what `repmgr-vip repmgr-conf` prints"
        if key == "promote_command" and have and have == want.split(" --control ")[0]:
            yield CheckResult(name, True, "works, but names no control socket: promote starts "
                              f"the full CLI before asking the daemon (50-80 ms); {fix}",
                              warning=True)
            continue
        if key in ESSENTIAL_HOOKS:
            yield CheckResult(name, False, f"{problem}; {fix}")
        else:
            yield CheckResult(name, True, f"{problem}: {WHAT_IS_LOST.get(key, 'not wired')}; "
                              f"if that is not intended, {fix}", warning=True)
    wanted = set(expected["event_notifications"].split(","))
    listed = {e.strip() for e in actual.get("event_notifications", "").split(",") if e.strip()}
    name = "repmgr.conf event_notifications"
    if not listed:
        yield CheckResult(name, True, "not set: repmgr notifies every event")
    elif wanted - listed:
        yield CheckResult(name, False, f"lacks {', '.join(sorted(wanted - listed))}: the VIP "
                          f"would not follow those events; {fix}")
    else:
        yield CheckResult(name, True, f"includes the {len(wanted)} events repmgr-vip acts on")


def _check_repmgrd(config: Config) -> CheckResult:
    from repmgr_vip.adapters.repmgr import repmgrd_pid

    pid = repmgrd_pid(config)
    if pid is None:
        return CheckResult("repmgrd", True, "not running on this node: no automatic failover "
                           "from here; start it (`repmgr daemon start` as postgres)", warning=True)
    return CheckResult("repmgrd", True, f"running, pid {pid}")


def _check_subnet(config: Config, network: VipNetwork) -> CheckResult:
    """A VIP outside the interface's subnets is not reachable by ARP (or NDP) from the
    clients' LAN. Each address of a dual-stack VIP is checked against the node's own
    addresses of its family; the worst answer is the one shown."""
    state = network.interface_state()
    results = [_subnet_of(config, vip, state.addresses) for vip in config.vip.all]
    failed = [r for r in results if not r.ok]
    warned = [r for r in results if r.warning]
    if failed or warned or len(results) == 1:
        return (failed or warned or results)[0]
    return CheckResult("VIP subnet", True, "; ".join(r.detail for r in results))


def _subnet_of(config: Config, vip: VipInterface, addresses: tuple[str, ...]) -> CheckResult:
    name = "VIP subnet"
    family = f"IPv{vip.version}"
    own: list[VipInterface] = []
    for text in addresses:
        try:
            address = ipaddress.ip_interface(text)
        except ValueError:
            continue
        if (address.version == vip.version and address.ip != vip.ip
                and not address.ip.is_link_local):
            own.append(address)
    if not own:
        return CheckResult(name, False, f"{config.vip.interface} has no {family} address of its "
                           "own; the VIP needs the node's address on the same subnet")
    same = [a for a in own if a.network == vip.network]
    if same:
        return CheckResult(name, True, f"{vip.network} as {same[0]} on {config.vip.interface}")
    near = [a for a in own if vip.ip in a.network or a.ip in vip.network]
    if near:
        return CheckResult(name, True, f"{vip.with_prefixlen} overlaps {near[0]} with another "
                           "prefix length; use the interface's prefix in vip.address",
                           warning=True)
    return CheckResult(name, False, f"{vip.with_prefixlen} is on no subnet of "
                       f"{config.vip.interface} ({', '.join(str(a) for a in own)}); fix "
                       "vip.address or vip.interface")


def _check_replica(config: Config) -> Iterator[CheckResult]:
    """[replica_vip]: its interface, each address's subnet (and IPv6 prerequisites), and
    `prefer` naming registered nodes (only knowable with the node list)."""
    from repmgr_vip.app.replica import prefer_error, replica_config, replica_network, unknown_prefer

    if config.replica is None:
        return
    network = replica_network(config)
    assert network is not None
    own = replica_config(config)
    state = network.interface_state()
    if not state.exists:
        yield CheckResult(f"replica VIP interface {own.vip.interface}", False,
                          "does not exist; fix replica_vip.interface")
        return
    for vip in own.vip.all:
        result = _subnet_of(own, vip, state.addresses)
        yield CheckResult("replica VIP subnet", result.ok,
                          result.detail.replace("vip.", "replica_vip."), result.warning)
    yield from ipv6_checks(own.vip.interface, network.mode,
                           [a.with_prefixlen for a in own.vip.all if a.version == 6])
    holder = "holds it" if network.holds() else "does not hold it"
    yield CheckResult("replica VIP", True, f"{own.vip.cidr} on {own.vip.interface}; this node "
                      f"{holder} (max lag {config.replica.max_lag_bytes} bytes)")
    if config.replica.prefer:
        try:
            names = [n.node_name for n in cluster.registered_nodes(config)]
        except VipError as exc:
            yield CheckResult("replica_vip.prefer", True, f"cannot tell: {exc}", warning=True)
            return
        unknown = unknown_prefer(config, names)
        yield CheckResult("replica_vip.prefer", unknown is None,
                          prefer_error(unknown) if unknown else ", ".join(config.replica.prefer))


UNPROTECTED = ("a network blip that heals leaves the VIP on two nodes until someone acts "
               "(only the daemon removes it from a returning old primary); start it there "
               "(systemctl enable --now repmgr-vip)")


def _check_daemons(config: Config) -> Iterator[CheckResult]:
    """The daemon on this node and, over SSH (`local-status`), on every registered node."""
    from repmgr_vip.app.status import _remote_status

    try:
        nodes = [n for n in cluster.registered_nodes(config) if n.active]
    except VipError:
        nodes = []
    answers: list[tuple[str, dict[str, Any] | str]] = []
    if not any(n.node_id == config.repmgr.node_id for n in nodes):  # unregistered: still ask
        from repmgr_vip.app.status import local_status

        answers.append((config.repmgr.node_name, local_status(config)))
    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        answers += list(zip([n.node_name for n in nodes],
                            pool.map(lambda n: _remote_status(config, n), nodes), strict=True))
    for node_name, answer in answers:
        name = f"daemon on {node_name}"
        if isinstance(answer, str):
            yield CheckResult(name, True, f"cannot tell ({answer}); if it is not running, "
                              + UNPROTECTED, warning=True)
        elif answer.get("daemon_pid") is None:
            yield CheckResult(name, True, "not running: " + UNPROTECTED, warning=True)
        else:
            yield CheckResult(name, True, f"running, pid {answer['daemon_pid']}")


def wiring_checks(config: Config, network: VipNetwork
                  ) -> list[tuple[str, Callable[[], Iterator[CheckResult]]]]:
    """What connects the pieces: repmgr.conf's hooks, repmgrd, the subnet, every daemon."""
    return [
        ("repmgr.conf hooks", lambda: _check_hook_lines(config)),
        ("repmgrd", lambda: iter([_check_repmgrd(config)])),
        ("VIP subnet", lambda: iter([_check_subnet(config, network)])),
        ("daemon", lambda: _check_daemons(config)),
    ]


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
        ("replica VIP", lambda: _check_replica(config)),
    ]
    checks += wiring_checks(config, network)
    for name, check in checks:
        try:
            yield from check()
        except VipError as exc:
            yield CheckResult(name, False, str(exc))


LINE = re.compile(r"^(ok|WARN|FAIL)\s+(.*)$")


@dataclass(frozen=True)
class NodeCheck:
    node_name: str
    result: CheckResult

    def line(self, width: int) -> str:
        return f"{self.node_name.ljust(width)}  {self.result.line()}"


def _parse_check_output(text: str) -> list[CheckResult]:
    results = []
    for line in text.splitlines():
        found = LINE.match(line)
        if not found:
            continue
        status, rest = found.groups()
        item, _, detail = rest.partition(": ")
        results.append(CheckResult(item, status != "FAIL", detail, warning=status == "WARN"))
    return results


def _node_checks(config: Config, node: NodeRecord, timeout: float) -> list[CheckResult]:
    if not node.host:
        return [CheckResult("ssh", False, "no host= in its conninfo; cannot reach it by SSH")]
    result = run_remote(config, node.host,
                        remote_vip_command(config, node.node_name, node.node_id, "check"),
                        timeout=timeout)
    parsed = _parse_check_output(result.stdout)
    if not parsed:
        return [CheckResult("ssh", False, f"{node.host}: `repmgr-vip check` gave no answer "
                            f"({first_line(result.stderr) or f'exit {result.returncode}'})")]
    if result.returncode not in (0, 1):
        parsed.append(CheckResult("check", False, f"exited {result.returncode}"))
    return parsed


def check_all(config: Config, network: VipNetwork) -> Iterator[NodeCheck]:
    """`check` on every registered node (this one directly, the others over SSH)."""
    nodes = [n for n in cluster.registered_nodes(config) if n.active]
    timeout = float(config.fencing.ssh_command_timeout + 60)
    others = [n for n in nodes if n.node_id != config.repmgr.node_id]
    with ThreadPoolExecutor(max_workers=max(1, len(others))) as pool:
        remote = {n.node_id: pool.submit(_node_checks, config, n, timeout) for n in others}
        for result in run_checks(config, network):
            yield NodeCheck(config.repmgr.node_name, result)
        for node in others:
            for result in remote[node.node_id].result():
                yield NodeCheck(node.node_name, result)


def print_check_all(config: Config, network: VipNetwork) -> int:
    """Prints `check --all` as it comes; 1 if any item on any node failed."""
    width = 0
    failed = 0
    try:
        width = max(len(n.node_name) for n in cluster.registered_nodes(config))
    except (VipError, ValueError):
        width = len(config.repmgr.node_name)
    for item in check_all(config, network):
        print(item.line(width), flush=True)
        failed += not item.result.ok
    print(f"{failed} check(s) failed" if failed else "all checks passed on every node")
    return 1 if failed else 0
