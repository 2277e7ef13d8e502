"""The edges of the core: what the daemon, fencing and claims touch, as small interfaces.

Each port has one real adapter (`ip`/`arping`, psycopg, ssh, the state directory, the system
clock) and one in-memory fake in `repmgr_vip.testing`. The daemon and fencing receive them as
constructor arguments, so the same code runs on a host and inside a model of a whole cluster.
Nothing here does I/O (tests/unit/test_layers.py checks the imports).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from repmgr_vip.core.decide import Decision, Peer
from repmgr_vip.core.model import InterfaceState, NodeView, ProbeResult

if TYPE_CHECKING:  # a row of repmgr.nodes; only its type is needed here
    from concurrent.futures import Future

    from repmgr_vip.core.model import NodeRecord


class VipAddress(Protocol):
    """The VIP on this node's interface, and ARP for it on the segment."""

    mode: str  # how changes are made (root, sudo, fake): for the log

    def interface_state(self) -> InterfaceState: ...
    def holds(self) -> bool: ...
    def add(self) -> bool: ...  # True if it was added now, False if it was already there
    def remove(self) -> bool: ...  # True if it was removed now
    def announce(self) -> None: ...  # gratuitous ARP
    def probe(self) -> ProbeResult: ...  # who else answers ARP for the VIP
    # a peer takes the VIP: opened before the release, started after it, for a moment it
    # resets the SYNs clients still send to our MAC (None: not here, or not possible)
    def stale_refusal(self) -> StaleRefusal | None: ...


class StaleRefusal(Protocol):
    def start(self) -> None: ...  # the VIP is gone: answer
    def cancel(self) -> None: ...  # it was not released after all


class NodeViews(Protocol):
    """What the daemon knows of the cluster: never blocks longer than a cycle allows."""

    def local(self) -> NodeView: ...
    def local_surely_down(self) -> bool: ...  # connection refused: PostgreSQL is not running
    def refresh(self) -> None: ...  # re-read the registered nodes (the last list meanwhile)
    def peers(self) -> tuple[Peer, ...]: ...  # every other registered, active node, as seen
    def nodes(self) -> Sequence[NodeRecord]: ...  # the same nodes, for fencing


class ReleaseResult(Protocol):
    @property
    def ok(self) -> bool: ...
    @property
    def returncode(self) -> int: ...
    @property
    def stdout(self) -> str: ...
    @property
    def macs(self) -> tuple[str, ...]: ...  # the node's VIP interface MAC(s), if it said


class ReleaseSession(Protocol):
    """A remote release under way; it may never finish (a frozen host): kill it."""

    def finished(self) -> bool: ...
    def result(self) -> ReleaseResult: ...
    def kill(self) -> None: ...


class RemoteRelease(Protocol):
    def start_release(self, node: NodeRecord) -> ReleaseSession: ...


@runtime_checkable
class PreparingRelease(Protocol):
    """A RemoteRelease that can open the way to a node before asking it (the warm link: the
    old primary's connection is greeted while the others release; its own release then
    takes one round trip)."""

    def prepare(self, node: NodeRecord) -> None: ...


FenceRunner = Callable[["NodeRecord"], bool]  # fence_command for one node: True if it succeeded


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class Prober(Protocol):
    """ARP probes running alongside a fencing round (see fencing.Prober)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def latest(self) -> tuple[str, ...] | None: ...
    def result_since(self, since: float, timeout: float) -> tuple[str, ...] | None: ...
    # the latest complete proof started before a moment; False: none will ever be complete
    def complete_before(self, moment: float) -> tuple[str, ...] | bool | None: ...


ProberFactory = Callable[[VipAddress], Prober]


class StateFiles(Protocol):
    """The daemon's state directory: the node's lock, its state file, marker and journal.

    Writes may fail (a full disk); the daemon must keep running and keep the VIP rules.
    """

    def lock(self, timeout: float) -> AbstractContextManager[None]: ...  # raises LockBusy
    def write_state(self, text: str) -> None: ...  # raises OSError
    def marker_age(self) -> float | None: ...  # seconds since fence-self, None: no marker
    def write_marker(self, reason: str) -> None: ...  # fence-self's marker; raises OSError
    def clear_marker(self) -> None: ...  # raises OSError
    def release_request_age(self) -> float | None: ...  # since a peer asked us to release
    def write_release_request(self, reason: str) -> None: ...  # raises OSError
    def clear_release_request(self) -> None: ...  # raises OSError
    def journal(self, node: str, source: str, action: str, reason: str,
                **kw: Any) -> None: ...  # never raises
    def read_journal(self, offset: int) -> tuple[list[Mapping[str, Any]], int]: ...


class Lease(Protocol):
    def tick(self, decision: Decision) -> None: ...


class LeasedAddress(Protocol):
    """The VIP as a kernel address with a lifetime (vip.lease): what LeaseKeeper renews."""

    def renew(self) -> None: ...  # IPv4 kernels CREATE a missing address here: see lease.py
    def remove(self) -> bool: ...


class PromoteRun(Protocol):
    """`repmgr standby promote` running in the background."""

    def poll(self) -> int | None: ...  # its exit status once it ended
    def finish(self) -> int: ...  # waits for it


class LocalNode(Protocol):
    """What a hook asks of its own node besides the VIP and the state directory."""

    def view(self, timeout: float) -> NodeView: ...  # local PostgreSQL's role and timeline
    def others(self, cached: bool = False) -> list[NodeRecord]: ...  # fresh: raises VipError
    # the fresh list, read meanwhile (a fencing round starts on the cached one)
    def others_soon(self) -> Future[list[NodeRecord]]: ...
    def start_promote(self) -> PromoteRun: ...
    def start_retrier(self, timeline: int, nodes: Sequence[str]) -> None: ...  # release_retry
    def release_replica(self) -> None: ...  # [replica_vip] never stays on a primary
    def checkpoint(self) -> None: ...  # after a promotion; raises VipError
