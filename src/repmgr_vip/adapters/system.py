"""Real adapters for the ports that have no module of their own: the clock, the state directory.

The others are `network.VipNetwork` (VipAddress), the daemon's watchers (`daemon.DaemonViews`)
and `fencing.SshRelease` (RemoteRelease).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from repmgr_vip.adapters import journal, statefiles
from repmgr_vip.adapters.lock import vip_lock
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config
from repmgr_vip.core.decide import Decision


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class FileState:
    """The state directory on disk (statefiles, the flock, the journal)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        return vip_lock(self.config.lock_path, timeout)

    def write_state(self, text: str) -> None:
        # status's heartbeat, every period: no fsync (a crash leaves it a period old)
        statefiles.write_atomic(statepaths.daemon_state_file(self.config.state_dir), text,
                                durable=False)

    def marker_age(self) -> float | None:
        return statefiles.marker_age(statepaths.self_fence_marker(self.config.state_dir))

    def write_marker(self, reason: str) -> None:
        statefiles.write_atomic(statepaths.self_fence_marker(self.config.state_dir),
                                statefiles.marker_text(reason))

    def clear_marker(self) -> None:
        statefiles.remove(statepaths.self_fence_marker(self.config.state_dir))

    def release_request_age(self) -> float | None:
        return statefiles.marker_age(statepaths.release_request_marker(self.config.state_dir))

    def write_release_request(self, reason: str) -> None:
        statefiles.write_atomic(statepaths.release_request_marker(self.config.state_dir),
                                statefiles.marker_text(reason))

    def clear_release_request(self) -> None:
        statefiles.remove(statepaths.release_request_marker(self.config.state_dir))

    def journal(self, node: str, source: str, action: str, reason: str, **kw: Any) -> None:
        journal.record(self.config.state_dir, node, source, action, reason, **kw)

    def read_journal(self, offset: int) -> tuple[list[Mapping[str, Any]], int]:
        return journal.read_from(self.config.state_dir, offset)


class NoLease:
    """For an address that is not a kernel address (a fake): nothing to renew."""

    def tick(self, decision: Decision) -> None:
        pass
