"""Keeps asking unreachable nodes to release the VIP after a promotion, until each confirms.

A promotion proceeds once ARP shows the VIP free; a node that was only cut off the wire
still has it and will answer again when its link returns. The daemon on that node releases it
by itself, but without a daemon nothing would: so the promoting hook leaves this small
detached process behind, which retries the remote release with a short spacing, so the
returning node loses the VIP within about two seconds of its link coming back. A probe of
the node's SSH port (adapters/reach) starts an attempt as soon as the node answers again,
instead of at the next attempt's SYN retransmission, up to a second later.

The remote command carries the guard (`release --unless-newer-than TIMELINE`): a node that
has meanwhile become primary on a newer timeline keeps its VIP; the truth is judged there.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from repmgr_vip.adapters import cluster
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.reach import ReachProbe, ssh_endpoint
from repmgr_vip.adapters.remote import remote_vip_command, ssh_argv
from repmgr_vip.config.schema import Config
from repmgr_vip.core.model import NodeRecord

FIRST_SPACING = 0.25
MAX_SPACING = 1.0  # keeps "released within ~2 s of the link coming back"
ATTEMPTS_IN_FLIGHT = 3  # overlapping attempts: a new SYN leaves at once when the link returns
ATTEMPT_CONNECT_TIMEOUT = 2
LOCAL_CHECK_EVERY = 2.0
EXIT_STALE = 3  # what `release --unless-newer-than` exits with when the node is newer


def retry_argv(config: Config, timeline: int, node_names: Sequence[str]) -> list[str]:
    return [config.remote.command, "-c", str(config.path.absolute()), "retry-release",
            f"--timeline={timeline}", *node_names]


def start_retrier(config: Config, timeline: int, node_names: Sequence[str]) -> bool:
    """Starts the retrier detached from the hook (repmgr waits for the hook, not for this)."""
    if not node_names or config.fencing.release_retry_for <= 0:
        return False
    from repmgr_vip.adapters.process import start_detached

    try:
        start_detached(retry_argv(config, timeline, node_names))
    except OSError as exc:
        LOG.error("could not start the release retrier: %s; a returning node may keep the VIP "
                  "until the daemon or a person removes it", exc)
        return False
    LOG.warning("nodes %s did not confirm their release; retrying in the background for up "
                "to %d s", ", ".join(node_names), config.fencing.release_retry_for)
    return True


@dataclass
class _Target:
    record: NodeRecord
    probe: ReachProbe | None = None
    attempts: list[subprocess.Popen[bytes]] = field(default_factory=list)
    next_at: float = 0.0
    spacing: float = FIRST_SPACING
    done: str = ""


def _attempt_argv(config: Config, record: NodeRecord, timeline: int) -> list[str]:
    remote = remote_vip_command(config, record.node_name, record.node_id, "release",
                                f"--unless-newer-than={timeline}")
    argv = ssh_argv(config, record.host, remote)
    # a shorter connect timeout than fencing's: attempts overlap, none needs to wait long
    return [word if not word.startswith("ConnectTimeout=") else
            f"ConnectTimeout={ATTEMPT_CONNECT_TIMEOUT}" for word in argv]


def run_retrier(config: Config, timeline: int, node_names: Sequence[str]) -> int:
    """The retrier's loop; returns 0 when every node confirmed or the retrier stood down."""
    from repmgr_vip.adapters.process import start_detached_child

    wanted = set(node_names)
    records = [r for r in cluster.cached_nodes(config) if r.node_name in wanted and r.host]
    targets = {r.node_name: _Target(r, ReachProbe(partial(ssh_endpoint, config, r.host)))
               for r in records}
    for name in sorted(wanted - set(targets)):
        LOG.error("release retrier: node %s has no usable host; cannot reach it", name)
    end = time.monotonic() + config.fencing.release_retry_for
    next_local_check = 0.0
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_local_check:
            next_local_check = now + LOCAL_CHECK_EVERY
            local = cluster.local_view(config, timeout=2.0)
            if local.reachable and (local.in_recovery or (local.timeline or 0) > timeline):
                LOG.info("release retrier: this node is no longer the primary of timeline %d; "
                         "standing down", timeline)
                break
        for target in targets.values():
            if target.done:
                continue
            for proc in list(target.attempts):
                code = proc.poll()
                if code is None:
                    continue
                target.attempts.remove(proc)
                if code == 0:
                    target.done = "released"
                elif code == EXIT_STALE:
                    target.done = "is primary on a newer timeline; left alone"
            if target.done:
                LOG.warning("release retrier: node %s %s", target.record.node_name, target.done)
                _stop(target)
                continue
            # the node answers again: ask now, not at an attempt's next SYN (one more attempt
            # than usual may then be under way: the probe answers once per REST_AFTER_ANSWER)
            early = target.probe is not None and target.probe.answered(now)
            if early or (now >= target.next_at and len(target.attempts) < ATTEMPTS_IN_FLIGHT):
                target.attempts.append(start_detached_child(
                    _attempt_argv(config, target.record, timeline)))
                target.next_at = now + target.spacing
                target.spacing = min(MAX_SPACING, target.spacing * 1.5)
        if all(t.done for t in targets.values()):
            return 0
        time.sleep(0.05)
    for target in targets.values():
        _stop(target)
    left = [t.record.node_name for t in targets.values() if not t.done]
    if left and time.monotonic() >= end:
        LOG.error("release retrier: gave up on %s after %d s", ", ".join(left),
                  config.fencing.release_retry_for)
        return 1
    return 0


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)


def _stop(target: _Target) -> None:
    for proc in target.attempts:
        _end(proc)
    target.attempts.clear()
    if target.probe is not None:
        target.probe.close()
