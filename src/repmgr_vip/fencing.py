"""Take the VIP away from every other node before this one may hold it.

SSH releases go to all other registered nodes at once while this node probes ARP in a loop.
Silence on ARP proves that no host on the segment holds the VIP, so a dead host (SSH hanging
until its timeout) does not delay the handover; the SSH sessions still running are left to
finish on their own, which covers a host that was only cut off the wire. If the VIP still
answers when every session has ended, the configured fence_command runs (for example an IPMI
power-off), and only silence after that lets the caller proceed.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from repmgr_vip.cluster import NodeRecord
from repmgr_vip.config import Config
from repmgr_vip.errors import VipError
from repmgr_vip.log import LOG
from repmgr_vip.network import VipNetwork
from repmgr_vip.process import first_line, run
from repmgr_vip.remote import RemoteSession, remote_vip_command, start_remote

IN_USE_RETRY = 0.05


@dataclass
class FenceReport:
    released: list[str] = field(default_factory=list)  # confirmed by the node itself
    failed: list[str] = field(default_factory=list)  # SSH or the remote release failed
    pending: list[str] = field(default_factory=list)  # still running when ARP proved it free
    fenced: list[str] = field(default_factory=list)  # fence_command succeeded
    answered_by: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def vip_free(self) -> bool:
        return not self.answered_by

    def summary(self) -> str:
        parts = [f"released on {','.join(self.released) or 'none'}"]
        if self.failed:
            parts.append(f"unreachable/failed: {','.join(self.failed)}")
        if self.pending:
            parts.append(f"not waited for: {','.join(self.pending)}")
        if self.fenced:
            parts.append(f"fenced: {','.join(self.fenced)}")
        holders = ",".join(self.answered_by)
        parts.append("VIP free" if self.vip_free else f"VIP answers from {holders}")
        return "; ".join(parts) + f" ({self.seconds:.2f} s)"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def fence_command_argv(template: str, node: NodeRecord) -> list[str]:
    """Splits the template into words first, then fills placeholders: no shell ever sees data."""
    values = {"{node_name}": node.node_name, "{node_id}": str(node.node_id), "{host}": node.host}
    words = []
    for word in shlex.split(template):
        for placeholder, value in values.items():
            word = word.replace(placeholder, value)
        words.append(word)
    return words


def _run_fence_command(config: Config, node: NodeRecord) -> bool:
    argv = fence_command_argv(config.fencing.fence_command, node)
    LOG.warning("running fence_command for node %s: %s", node.node_name, argv)
    try:
        result = run(argv, timeout=config.fencing.fence_timeout)
    except VipError as exc:
        LOG.error("fence_command for %s failed: %s", node.node_name, exc)
        return False
    if result.returncode != 0:
        LOG.error("fence_command for %s exited %d: %s", node.node_name, result.returncode,
                  first_line(result.stderr) or first_line(result.stdout))
    return result.returncode == 0


def fence_others(config: Config, network: VipNetwork, nodes: Sequence[NodeRecord]) -> FenceReport:
    started = time.monotonic()
    report = FenceReport()
    sessions: dict[str, RemoteSession] = {}
    for node in nodes:
        if not node.host:
            report.failed.append(node.node_name)
            continue
        argv = remote_vip_command(config, node.node_name, node.node_id, "release")
        sessions[node.node_name] = start_remote(config, node.host, argv)
    deadline = started + config.fencing.ssh_command_timeout

    def collect() -> None:
        for name, session in list(sessions.items()):
            if not session.finished():
                continue
            result = session.result()
            del sessions[name]
            if result.ok:
                report.released.append(name)
                LOG.info("node %s: %s", name, _last_line(result.stdout) or "released")
            else:
                report.failed.append(name)
                LOG.warning("node %s: remote release failed (exit %d): %s", name,
                            result.returncode, _last_line(result.stdout))

    while True:
        answered = network.probe().answered_by
        collect()
        if not answered:
            report.pending = sorted(sessions)  # they go on by themselves; ARP says free
            break
        if not sessions:
            break
        if time.monotonic() >= deadline:
            for name, session in sessions.items():
                session.kill()
                report.failed.append(name)
                LOG.warning("node %s: no answer over SSH within %d s", name,
                            config.fencing.ssh_command_timeout)
            sessions.clear()
            break
        time.sleep(IN_USE_RETRY)
    report.answered_by = answered
    if answered and config.fencing.fence_command:
        suspects = [n for n in nodes if n.node_name not in report.released] or list(nodes)
        for node in suspects:
            if _run_fence_command(config, node):
                report.fenced.append(node.node_name)
        report.answered_by = network.probe().answered_by
    report.seconds = time.monotonic() - started
    return report
