"""`repmgr-vip status`: one table of every node, from any node, and any conflict in it."""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from repmgr_vip.adapters import cluster, statefiles
from repmgr_vip.adapters.network import VipNetwork
from repmgr_vip.adapters.remote import remote_vip_command, run_remote
from repmgr_vip.app.daemon import daemon_pid
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config
from repmgr_vip.core.errors import VipError
from repmgr_vip.core.model import NodeRecord

PEER_TIMEOUT = 2.0


def local_status(config: Config) -> dict[str, Any]:
    """What only this node can tell: the VIP on its interface and whether its daemon runs."""
    network = VipNetwork(config)
    state = network.interface_state()
    last: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(statefiles.read_text(statepaths.daemon_state_file(config.state_dir)))
        if isinstance(data, dict):
            last = data
    return {
        "node_id": config.repmgr.node_id,
        "holds_vip": state.holds_all(config.vip.cidrs),
        "addresses": state.held_map(config.vip.cidrs),
        "interface_up": state.up,
        "daemon_pid": daemon_pid(config),
        "last_decision": last.get("reason", ""),
    }


@dataclass(frozen=True)
class NodeStatus:
    node_id: int
    node_name: str
    node_type: str
    role: str  # primary | standby | down
    timeline: int | None
    reachable: bool
    holds_vip: bool | None  # None: could not ask the node
    daemon: bool | None
    note: str
    addresses: dict[str, bool] = field(default_factory=dict)  # dual stack: each address


def _remote_status(config: Config, node: NodeRecord) -> dict[str, Any] | str:
    if node.node_id == config.repmgr.node_id:
        return local_status(config)
    try:
        host = node.host
    except VipError as exc:
        return f"not asked: {exc}"
    result = run_remote(config, host,
                        remote_vip_command(config, node.node_name, node.node_id, "local-status"),
                        timeout=config.fencing.ssh_connect_timeout + 5)
    if not result.ok:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        return f"ssh: {lines[-1] if lines else 'failed'}"
    try:
        data = json.loads(result.stdout)
    except ValueError:
        return "ssh: unexpected answer"
    if not isinstance(data, dict):
        return f"ssh: unexpected answer (JSON {type(data).__name__}, not an object)"
    return data


def collect(config: Config) -> tuple[list[NodeStatus], list[str]]:
    nodes = cluster.registered_nodes(config)
    data_nodes = [n for n in nodes if n.active]
    with ThreadPoolExecutor(max_workers=max(1, 2 * len(data_nodes))) as pool:
        views = pool.map(lambda n: cluster.query_view(n.node_id, n.conninfo, PEER_TIMEOUT),
                         data_nodes)
        remotes = pool.map(lambda n: _remote_status(config, n), data_nodes)
        pairs = list(zip(data_nodes, views, remotes, strict=True))
    rows = []
    for node, view, remote in pairs:
        role = "down" if not view.reachable else ("standby" if view.in_recovery else "primary")
        addresses: dict[str, bool] = {}
        if isinstance(remote, str):
            holds, daemon, note = None, None, remote
        else:
            answer = remote.get("holds_vip")
            holds = answer if isinstance(answer, bool) else None
            daemon = remote.get("daemon_pid") is not None
            note = str(remote.get("last_decision", ""))
            given = remote.get("addresses")
            if isinstance(given, dict):
                addresses = {str(k): v for k, v in given.items() if isinstance(v, bool)}
        rows.append(NodeStatus(node.node_id, node.node_name, node.node_type, role,
                               view.timeline, view.reachable, holds, daemon, note, addresses))
    return rows, conflicts(rows)


def conflicts(rows: list[NodeStatus]) -> list[str]:
    found = []
    holders = [r.node_name for r in rows if r.holds_vip or any(r.addresses.values())]
    primaries = [r.node_name for r in rows if r.role == "primary"]
    if len(holders) > 1:
        found.append(f"VIP held by {len(holders)} nodes: {', '.join(holders)}")
    if len(primaries) > 1:
        found.append(f"{len(primaries)} primaries: {', '.join(primaries)}")
    for row in rows:
        if row.holds_vip and row.role != "primary":
            found.append(f"{row.node_name} holds the VIP but is {row.role}")
        elif not row.holds_vip and any(row.addresses.values()):
            held = ", ".join(a for a, on in row.addresses.items() if on)
            found.append(f"{row.node_name} holds only part of the VIP ({held})")
    if primaries and not holders and all(r.holds_vip is not None for r in rows):
        found.append("no node holds the VIP")
    return found


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters, escape sequences and other invisible
    code points (bidi overrides) shown as Python-style escapes; a backslash doubled."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def render(rows: list[NodeStatus], found: list[str]) -> str:
    def yes(value: bool | None) -> str:
        return "?" if value is None else ("yes" if value else "no")

    def vip(row: NodeStatus) -> str:
        if not row.holds_vip and any(row.addresses.values()):
            return "only " + ",".join(a.split("/")[0] for a, on in row.addresses.items() if on)
        return yes(row.holds_vip)

    header = ("id", "name", "type", "role", "timeline", "reachable", "VIP", "daemon", "note")
    table = [header] + [
        (str(r.node_id), printable(r.node_name), printable(r.node_type), r.role,
         str(r.timeline or "-"), yes(r.reachable), vip(r), yes(r.daemon),
         printable(r.note)[:60])
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in table]
    lines.append("conflicts: " + (printable("; ".join(found)) if found else "none"))
    return "\n".join(lines)


def as_json(rows: list[NodeStatus], found: list[str]) -> str:
    return json.dumps({"nodes": [asdict(r) for r in rows], "conflicts": found}, indent=2)
