"""In-memory fakes for every port: a whole cluster and its L2 segment, no root, no network.

Like httpx's MockTransport, these ship with the package so that the real `Daemon` and
`Fencing` can run against a simulated world, in tests and in a model of the cluster
(tests/unit/test_model.py)::

    clock = FakeClock()
    world = FakeCluster(["pg1", "pg2", "pg3"], clock)
    world.promote("pg1", timeline=1); world.hosts["pg1"].vip = True
    configs = write_configs(tmp_path, world.names)
    daemons = {n: world.daemon(n, configs[n]) for n in world.names}
    world.cut("pg1", "pg2")            # pg1 -> pg2 only; cut(..., both=True) for both ways
    world.freeze("pg1")                # ARP still answers, SSH and SQL do not
    clock.sleep(1.0)                   # every hook in clock.hooks runs (daemon cycles)
    hooks.promote(configs["pg2"], own=world.hook_ports("pg2", configs["pg2"]))  # real hook

What the world models: nodes with a role and a timeline; links cut one way or both (a link
carries ARP, SSH and SQL alike: each needs both directions); frozen hosts (the kernel answers
ARP for an address it holds, user space does nothing); hosts powered off by fence_command;
foreign MACs answering for the VIP; fence_command that succeeds, fails or hangs; a full state
directory (writes fail, removals work); repmgr promoting a node (onto a new timeline, or onto
the newest one: a double promotion); the release retrier promote leaves behind; the VIP as a
kernel lease (vip.lease: the kernel removes it unless renewed, even on a frozen host; renewing
a missing address re-creates it, as IPv4 does). Peer views are the truth of the moment: the
real daemon's watchers may lag a period behind. `world.events` lists what happened, in order
(time, host, what), for tests of ordering.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repmgr_vip.adapters.lock import LockBusy
from repmgr_vip.adapters.log import LOG
from repmgr_vip.app.fencing import PRIOR_FRESH
from repmgr_vip.app.lease import lease_seconds
from repmgr_vip.config.schema import Config, load_config
from repmgr_vip.core.decide import Peer
from repmgr_vip.core.errors import CommandFailed, VipError
from repmgr_vip.core.model import InterfaceState, NodeRecord, NodeView, ProbeResult
from repmgr_vip.core.ports import VipAddress

if TYPE_CHECKING:
    from repmgr_vip.app.daemon import Daemon
    from repmgr_vip.app.fencing import Fencing
    from repmgr_vip.app.hooks import Hands

SSH_LATENCY = 0.05  # a release over ssh on a healthy host
ARP_SILENCE = 1.0  # an arping probe that nobody answers lasts its whole deadline
PROBE_ROUND = 0.05  # an answered probe, and the prober's pause before the next (IN_USE_RETRY)
TICK = 0.25  # FakeClock.sleep advances at most this much between runs of its hooks
PROMOTION_TIME = 0.5  # `repmgr standby promote` until PostgreSQL leaves recovery
REPMGR_NOTICES = 0.5  # ... until repmgr notices and exits (promote_check_interval)
RETRY_SPACING = 1.0  # the release retrier's attempts, at most this far apart


class FakeClock:
    """Monotonic time that moves only when someone sleeps; `hooks` run as it moves.

    The hooks are how other actors (every node's daemon) keep running while one actor
    (a hook's fencing round) waits.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.hooks: list[Callable[[], None]] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        target = self.now + max(0.0, seconds)
        while self.now < target:
            self.now = min(target, self.now + TICK)
            for hook in list(self.hooks):
                hook()


@dataclass
class Host:
    name: str
    node_id: int
    mac: str
    role: str = "standby"  # primary | standby (of the cluster's data)
    timeline: int = 1
    running: bool = True  # PostgreSQL
    pg_frozen: bool = False  # PostgreSQL stopped (SIGSTOP): queries time out, not refused
    frozen: bool = False  # user space stopped: ARP answers, SSH and SQL do not
    off: bool = False  # powered off by fence_command
    vip: bool = False  # the VIP is on its interface
    vip_expires: float | None = None  # vip.lease: when the kernel removes it (None: never)
    interface_up: bool = True
    disk_full: bool = False
    node_type: str = "standby"  # as registered in repmgr.nodes
    lock_holder: str = ""
    marker_at: float | None = None  # fence-self marker, fake monotonic time
    release_request_at: float | None = None  # a peer's release over ssh, fake monotonic time
    added_at: float = -1.0  # last time this host added the VIP
    confirmed_to: dict[str, float] = field(default_factory=dict)  # fencer -> time
    journal: list[Mapping[str, Any]] = field(default_factory=list)
    state_text: str = ""

    @property
    def user_space(self) -> bool:
        """Its processes run: it answers SSH and SQL (if PostgreSQL runs) and its daemon acts."""
        return not self.off and not self.frozen


class FakeCluster:
    """The hosts, the links between them and the outside world (foreign MACs, IPMI)."""

    def __init__(self, names: Sequence[str], clock: FakeClock) -> None:
        self.clock = clock
        self.names = list(names)
        self.hosts = {n: Host(n, i + 1, f"02:00:00:00:00:{i + 1:02x}")
                      for i, n in enumerate(names)}
        self.blocked: set[tuple[str, str]] = set()  # (a, b): a's packets do not reach b
        self.foreign: set[str] = set()  # MACs outside the cluster answering for the VIP
        self.foreign_since: dict[str, float] = {}  # when each one was first seen (tick)
        self.fence_mode = "ok"  # ok | fail | hang
        self.fence_timeout = 30.0
        self.ssh_connect_timeout = 3.0
        self.violations: list[str] = []  # broken rules seen by the fakes themselves
        self.fenced: list[str] = []
        # (fencer, target) -> when the fencer's latest round asked the target to release
        self.round_started: dict[tuple[str, str], float] = {}
        self.same_timeline = False  # the next promotion lands on the newest primary's timeline
        self.view_lag = 0.0  # how old a daemon's view of a peer may be (0: the truth)
        # the hooks' proofs hear every answer in their window (the root helper's LAN proof)
        self.complete_proofs = False
        self.ssh_latency = SSH_LATENCY  # a release over ssh (fresh ssh: half a second)
        self.retriers: list[FakeRetrier] = []
        self.events: list[tuple[float, str, str]] = []  # (time, host, what), in order
        clock.hooks.append(self.tick)

    def event(self, host: str, what: str) -> None:
        self.events.append((self.clock.now, host, what))

    def tick(self) -> None:
        """What runs without any daemon: kernels expire leased addresses, retriers retry."""
        for host in self.hosts.values():
            if host.vip and host.vip_expires is not None and self.clock.now >= host.vip_expires:
                host.vip = False
                self.event(host.name, "lease expired")
        for retrier in self.retriers:
            retrier.tick()
        self.retriers = [r for r in self.retriers if r.pending]
        self.foreign_since = {mac: self.foreign_since.get(mac, self.clock.now)
                              for mac in self.foreign}

    # --- the segment --------------------------------------------------------------------

    def cut(self, a: str, b: str, *, both: bool = False) -> None:
        self.blocked.add((a, b))
        if both:
            self.blocked.add((b, a))

    def partition(self, group: Sequence[str]) -> None:
        """Cuts every link between `group` and the other hosts, both ways."""
        for a in group:
            for b in self.names:
                if b not in group:
                    self.cut(a, b, both=True)

    def heal(self) -> None:
        self.blocked.clear()

    def talks(self, a: str, b: str) -> bool:
        """Packets go both ways between a and b (what ARP, SSH and SQL all need)."""
        if a == b:
            return True
        return (self.hosts[a].interface_up and self.hosts[b].interface_up
                and (a, b) not in self.blocked and (b, a) not in self.blocked)

    def arp_answers(self, asker: str) -> tuple[str, ...]:
        """Who answers `asker`'s ARP probe for the VIP: a kernel answers even when frozen."""
        macs = [h.mac for h in self.hosts.values()
                if h.name != asker and h.vip and h.interface_up and not h.off
                and self.talks(asker, h.name)]
        return tuple(sorted(macs) + sorted(self.foreign))

    # --- hosts --------------------------------------------------------------------------

    def freeze(self, name: str) -> None:
        self.hosts[name].frozen = True

    def resume(self, name: str) -> None:
        self.hosts[name].frozen = False

    def promote(self, name: str, timeline: int | None = None) -> int:
        """repmgr promoted `name`: primary on a new timeline (or the one given)."""
        host = self.hosts[name]
        host.role, host.node_type = "primary", "primary"
        host.timeline = timeline if timeline is not None else self.max_timeline() + 1
        self.event(name, f"promoted tl {host.timeline}")
        return host.timeline

    def finish_promotion(self, name: str) -> int:
        """PostgreSQL on `name` leaves recovery (repmgr's exit status): onto a new timeline, or
        onto the newest primary's one if `same_timeline`; the standbys it reaches follow."""
        host = self.hosts[name]
        if not host.running or host.off or host.role != "standby":
            return 1
        primaries = [h.timeline for h in self.hosts.values() if h.role == "primary"]
        timeline = self.promote(name, max(primaries) if self.same_timeline and primaries
                                else None)
        for other in self.hosts.values():  # repmgrd makes the standbys follow
            if other.role == "standby" and self.talks(name, other.name):
                other.timeline = timeline
        return 0

    def max_timeline(self) -> int:
        return max(h.timeline for h in self.hosts.values())

    def sql(self, asker: str, target: str) -> NodeView:
        host = self.hosts[target]
        if not self.talks(asker, target) or host.off:
            return NodeView(host.node_id, False, error="timeout expired")
        if host.frozen or (host.pg_frozen and host.running):
            return NodeView(host.node_id, False, error="no answer (frozen)")
        if not host.running:
            return NodeView(host.node_id, False, error="connection refused")
        return NodeView(host.node_id, True, host.role == "standby", host.timeline)

    def records(self, but: str = "") -> list[NodeRecord]:
        return [NodeRecord(h.node_id, h.name, h.node_type, True, f"host={h.name} user=repmgr", 0)
                for h in self.hosts.values() if h.name != but]

    # --- ssh and IPMI -------------------------------------------------------------------

    def fence_runner(self, fencer: str) -> Callable[[NodeRecord], bool]:
        """fence_command as run by `fencer`: powers the node off, fails, or hangs."""

        def run(node: NodeRecord) -> bool:
            host = self.hosts[node.node_name]
            confirmed = host.confirmed_to.get(fencer)
            if (confirmed is not None and confirmed > host.added_at
                    and confirmed > self.round_started.get((fencer, host.name), 0.0)):
                self.violations.append(f"{fencer} fenced {host.name}, which had confirmed its "
                                       f"release in this round at {confirmed:.2f}")
            if self.fence_mode == "hang":
                self.clock.sleep(self.fence_timeout)
                return False
            if self.fence_mode == "fail":
                return False
            host.off, host.running, host.vip = True, False, False
            self.fenced.append(host.name)
            self.event(host.name, f"fenced by {fencer}")
            return True

        return run

    # --- ports for one node -------------------------------------------------------------

    def address(self, name: str, config: Config) -> FakeAddress:
        return FakeAddress(self, name, config.vip.cidr, lease_seconds(config))

    def prober(self, address: VipAddress) -> FakeProber:
        return FakeProber(address, self.clock, complete=self.complete_proofs)

    def daemon(self, name: str, config: Config) -> Daemon:
        """The real Daemon of one node, wired to this world."""
        from repmgr_vip.app.daemon import Daemon
        from repmgr_vip.app.lease import LeaseKeeper

        address, files = self.address(name, config), FakeFiles(self, name)
        lease = LeaseKeeper(config, address, None, self.clock.monotonic,
                            lifetime=address.lifetime, lock=files.lock) if address.lease else None
        return Daemon(config, network=address, views=FakeViews(self, name),
                      clock=self.clock, files=files, lease=lease,
                      remote=FakeRemote(self, name), fence_runner=self.fence_runner(name),
                      prober=self.prober)

    def hook_ports(self, name: str, config: Config) -> Hands:
        """What the real hooks act with (`hooks.promote(config, own=...)`, fence_self,
        handle_event), as when no daemon answers on the node's control socket."""
        from repmgr_vip.app.fencing import hook_round
        from repmgr_vip.app.hooks import Hands

        files = FakeFiles(self, name)
        return Hands(self.address(name, config), files.lock, "hook",
                     fencing={"remote": FakeRemote(self, name), "clock": self.clock,
                              "fence_runner": self.fence_runner(name), "prober": self.prober,
                              **hook_round(self.complete_proofs)},
                     node=FakeNode(self, name, config.fencing.release_retry_for > 0),
                     files=files, clock=self.clock)

    def fencing(self, name: str, config: Config, nodes: Sequence[NodeRecord], *,
                holder_last: float = 0.0, prior: tuple[str, ...] | None = None,
                late_prior: bool = False) -> Fencing:
        """A real fencing round started by `name` (as promote starts it; the daemon's rounds
        ask the old primary last: holder_last, and bring the MACs that answered their proof
        a moment ago: prior; a hook's round with complete proofs takes its first: late_prior,
        with complete_proofs set)."""
        from repmgr_vip.app.fencing import Fencing

        taken = self.clock.now
        return Fencing(config, self.address(name, config), nodes, remote=FakeRemote(self, name),
                       clock=self.clock, fence_runner=self.fence_runner(name),
                       prober=self.prober, holder_last=holder_last, late_prior=late_prior,
                       prior_proof=None if prior is None else lambda: (taken, prior))


class FakeAddress:
    """The VipAddress port on one host of a FakeCluster."""

    mode = "fake"

    def __init__(self, world: FakeCluster, name: str, cidr: str, lease: int = 0) -> None:
        self.world = world
        self.host = world.hosts[name]
        self.cidr = cidr
        self.lease = lease  # seconds; 0: a permanent address

    def interface_state(self) -> InterfaceState:
        h = self.host
        return InterfaceState(True, h.interface_up, h.mac, (self.cidr,) if h.vip else ())

    def holds(self) -> bool:
        return self.host.vip

    def add(self) -> bool:
        if self.host.vip:
            return False
        # README rule 2: a host outside the cluster holds it. One that started answering
        # less than fencing.PRIOR_FRESH ago may be missed (a daemon's proof taken before the
        # fencing round); the holder's conflict probe finds it afterwards.
        now, since = self.world.clock.now, self.world.foreign_since
        seen = sorted(m for m in self.world.foreign if now - since.get(m, now) > PRIOR_FRESH)
        if seen:
            self.world.violations.append(f"{self.host.name} added the VIP while "
                                         f"{', '.join(seen)} answers for it")
        self._create()
        return True

    def _create(self) -> None:
        now = self.world.clock.now
        self.host.vip, self.host.added_at = True, now
        self.host.vip_expires = now + self.lease if self.lease else None
        self.world.event(self.host.name, "add")

    def remove(self) -> bool:
        held, self.host.vip = self.host.vip, False
        if held:
            self.world.event(self.host.name, "remove")
        return held

    def stale_refusal(self) -> FakeRefusal | None:
        return FakeRefusal(self.world, self.host.name) if self.host.vip else None

    def lifetime(self) -> float | None:
        """What `ip -j address` shows: seconds left (inf: permanent), None: not held."""
        if not self.host.vip:
            return None
        expires = self.host.vip_expires
        return math.inf if expires is None else max(0.0, expires - self.world.clock.now)

    def renew(self) -> None:
        """`ip address change ... valid_lft N`: on IPv4 it CREATES a missing address."""
        if not self.host.vip:
            self.world.violations.append(f"{self.host.name}: a lease renewal re-created the VIP")
            self._create()
        self.host.vip_expires = self.world.clock.now + self.lease if self.lease else None

    def announce(self) -> None:
        pass

    def probe(self) -> ProbeResult:
        return ProbeResult(self.world.arp_answers(self.host.name))


@dataclass
class FakeRefusal:
    """The StaleRefusal port: its start is an event on the segment."""

    world: FakeCluster
    host: str

    def start(self) -> None:
        self.world.event(self.host, "refusing stale connections")

    def cancel(self) -> None:
        pass


class FakeProber:
    """The Prober port without a thread: probes on demand, on the fake clock.

    An answer comes at once; silence takes ARP_SILENCE, so right after a round starts the
    proof is still pending (latest() is None), as with the real arping.
    """

    def __init__(self, address: VipAddress, clock: FakeClock, complete: bool = False) -> None:
        self.address = address
        self.clock = clock
        self.started = clock.now
        self.complete = complete
        # complete proofs: one ends every PROBE_ROUND from the start; (started, answered),
        # recorded when asked for (the segment as it is then)
        self.proofs: list[tuple[float, tuple[str, ...]]] = []

    def start(self) -> None:
        self.started = self.clock.now

    def stop(self) -> None:
        pass

    def latest(self) -> tuple[str, ...] | None:
        answered = self.address.probe().answered_by
        if answered or self.clock.now >= self.started + ARP_SILENCE:
            return answered
        return None

    def complete_before(self, moment: float) -> tuple[str, ...] | bool | None:
        if not self.complete:
            return False
        ended = self.started + PROBE_ROUND * (len(self.proofs) + 1)
        while ended <= self.clock.now:
            self.proofs.append((ended - PROBE_ROUND, self.address.probe().answered_by))
            ended += PROBE_ROUND
        found: tuple[str, ...] | None = None
        for started, answered in self.proofs:
            if started < moment:
                found = answered
        return found

    def result_since(self, since: float, timeout: float) -> tuple[str, ...] | None:
        # an answer counts only from a probe started at `since` or later: one round trip
        if self.clock.now < since + PROBE_ROUND:
            self.clock.sleep(since + PROBE_ROUND - self.clock.now)
        answered = self.address.probe().answered_by
        if answered:
            return answered
        end = max(since, self.started + ARP_SILENCE)
        if self.clock.now < end:
            self.clock.sleep(end - self.clock.now)
        return self.address.probe().answered_by


@dataclass
class FakeResult:
    returncode: int
    stdout: str = ""
    macs: tuple[str, ...] = ()  # the interface it released from (the control link says it)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class FakeSession:
    """`repmgr-vip release` over ssh from one host to another, on the fake clock."""

    def __init__(self, world: FakeCluster, origin: str, target: str) -> None:
        self.world = world
        self.origin = origin
        self.target = world.hosts.get(target)
        self.started = world.clock.now
        self.outcome: FakeResult | None = None

    def finished(self) -> bool:
        if self.outcome is not None:
            return True
        now, host = self.world.clock.now, self.target
        if host is None:
            self.outcome = FakeResult(255, "ssh: Could not resolve hostname")
        elif host.off or not self.world.talks(self.origin, host.name):
            if now >= self.started + self.world.ssh_connect_timeout:
                self.outcome = FakeResult(255, "ssh: connect to host: Connection timed out")
        elif host.frozen or now < self.started + self.world.ssh_latency or host.lock_holder:
            return False  # a frozen host says nothing; `release` waits for the node's lock
        else:
            was = host.vip
            host.vip = False
            if not host.disk_full:  # as `repmgr-vip release` over ssh does (release_for_peer)
                host.release_request_at = now
            host.confirmed_to[self.origin] = now
            self.world.event(host.name, f"released for {self.origin}")
            self.outcome = FakeResult(0, "released" if was else "not held", (host.mac,))
        return self.outcome is not None

    def result(self) -> FakeResult:
        if not self.finished() or self.outcome is None:
            return FakeResult(-1, "killed")
        return self.outcome

    def kill(self) -> None:
        if self.outcome is None:
            self.outcome = FakeResult(-1, "killed")


class FakeLibpqResult:
    """The part of libpq's PGresult that pgsession.read_role reads."""

    def __init__(self, status: int, row: tuple[bytes | None, ...] = (),
                 error: bytes = b"") -> None:
        self.status = status
        self.ntuples = 1 if row else 0
        self.nfields = len(row)
        self.row = row
        self.error_message = error

    def get_value(self, row: int, column: int) -> bytes | None:
        return self.row[column]


class FakeLibpq:
    """A connection's libpq side (`conn.pgconn`) for pgsession.read_role: `answer()` gives
    (in recovery, timeline) or raises, which shows as a FATAL result, as a lost server does."""

    COMMAND_OK, TUPLES_OK, FATAL_ERROR = 1, 2, 7  # psycopg.pq.ExecStatus

    def __init__(self, answer: Callable[[], tuple[bool, int]]) -> None:
        self.answer = answer
        self.statements: dict[bytes, bytes] = {}
        self.prepares = 0

    def prepare(self, name: bytes, sql: bytes) -> FakeLibpqResult:
        self.prepares += 1
        self.statements[name] = sql
        return FakeLibpqResult(self.COMMAND_OK)

    def exec_prepared(self, name: bytes, params: Any) -> FakeLibpqResult:
        if name not in self.statements:
            return FakeLibpqResult(self.FATAL_ERROR, error=b"ERROR:  prepared statement "
                                   b"\"" + name + b"\" does not exist")
        try:
            in_recovery, timeline = self.answer()
        except Exception as exc:  # the server went away, or the fake says so
            return FakeLibpqResult(self.FATAL_ERROR, error=str(exc).encode())
        return FakeLibpqResult(self.TUPLES_OK, (b"t" if in_recovery else b"f",
                                                str(timeline).encode()))


def bpf_passes(program: list[tuple[int, int, int, int]], frame: bytes) -> bool:
    """Runs a classic BPF program (adapters.bpf) as the kernel does, for the opcodes
    bpf.assemble emits (a load past the frame's end drops it): True if the frame would reach
    the socket. The filters' unit tests compare it with what the Python readers accept."""
    a = x = pc = 0
    sizes = {0x20: 4, 0x28: 2, 0x30: 1}
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x06:  # ret
            return k > 0
        if code in sizes or code in (0x50, 0xB1):
            at, size = (x + k, 1) if code == 0x50 else (k, sizes.get(code, 1))
            if at + size > len(frame):
                return False
            value = int.from_bytes(frame[at:at + size], "big")
            if code == 0xB1:
                x = 4 * (value & 0x0F)
            else:
                a = value
        elif code == 0x54:
            a &= k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x45:
            pc += jt if a & k else jf
        else:
            raise AssertionError(f"opcode {code:#x} not modelled")


class FakeRemote:
    def __init__(self, world: FakeCluster, origin: str) -> None:
        self.world = world
        self.origin = origin

    def start_release(self, node: NodeRecord) -> FakeSession:
        # a confirmation after this ask belongs to this round (the old primary may be asked
        # after the others: Fencing.holder_last)
        self.world.round_started[(self.origin, node.host)] = self.world.clock.now
        return FakeSession(self.world, self.origin, node.host)


class FakeViews:
    """The NodeViews port: each node's own answer, through the links of the moment, or as
    last polled when `world.view_lag` > 0 (the real daemon's watchers poll once a period)."""

    def __init__(self, world: FakeCluster, name: str) -> None:
        self.world = world
        self.name = name
        self.polled: dict[str, tuple[float, NodeView]] = {}

    def local(self) -> NodeView:
        return self.world.sql(self.name, self.name)

    def local_surely_down(self) -> bool:
        return not self.world.hosts[self.name].running

    def refresh(self) -> None:
        pass

    def peers(self) -> tuple[Peer, ...]:
        return tuple(Peer(r.node_id, r.node_name, r.node_type, self._view(r.node_name))
                     for r in self.world.records(but=self.name))

    def _view(self, peer: str) -> NodeView:
        now = self.world.clock.now
        at, view = self.polled.get(peer, (-math.inf, NodeView(0, False)))
        if now - at >= self.world.view_lag:
            at, view = now, self.world.sql(self.name, peer)
            self.polled[peer] = (at, view)
        return view

    def nodes(self) -> list[NodeRecord]:
        return self.world.records(but=self.name)


class FakeFiles:
    """The StateFiles port: the node's lock, state file, marker and journal, in memory."""

    def __init__(self, world: FakeCluster, name: str) -> None:
        self.world = world
        self.host = world.hosts[name]

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        return self.hold("daemon")

    @contextmanager
    def hold(self, who: str) -> Iterator[None]:
        """The node's VIP lock; busy raises at once (the fake clock does not wait)."""
        if self.host.lock_holder:
            raise LockBusy(f"lock held by {self.host.lock_holder}")
        self.host.lock_holder = who
        try:
            yield
        finally:
            self.host.lock_holder = ""

    def write_state(self, text: str) -> None:
        if self.host.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.host.state_text = text

    def marker_age(self) -> float | None:
        at = self.host.marker_at
        return None if at is None else self.world.clock.now - at

    def write_marker(self, reason: str) -> None:
        if self.host.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.host.marker_at = self.world.clock.now

    def clear_marker(self) -> None:
        self.host.marker_at = None

    def release_request_age(self) -> float | None:
        at = self.host.release_request_at
        return None if at is None else self.world.clock.now - at

    def write_release_request(self, reason: str) -> None:
        if self.host.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.host.release_request_at = self.world.clock.now

    def clear_release_request(self) -> None:
        self.host.release_request_at = None

    def journal(self, node: str, source: str, action: str, reason: str, **kw: Any) -> None:
        if not self.host.disk_full:
            self.host.journal.append({"time": self.world.clock.now, "node": node,
                                      "source": source, "action": action, "reason": reason,
                                      **kw})

    def read_journal(self, offset: int) -> tuple[list[Mapping[str, Any]], int]:
        return list(self.host.journal[offset:]), len(self.host.journal)


class FakePromoteRun:
    """`repmgr standby promote` on the fake clock: PostgreSQL leaves recovery PROMOTION_TIME
    after the start, repmgr notices REPMGR_NOTICES later and exits (1 if PostgreSQL was down)."""

    def __init__(self, world: FakeCluster, name: str) -> None:
        self.world = world
        self.name = name
        self.promote_at = world.clock.now + PROMOTION_TIME
        self.promoted: int | None = None  # the promotion's outcome, once it happened

    def poll(self) -> int | None:
        now = self.world.clock.now
        if self.promoted is None and now >= self.promote_at:
            self.promoted = self.world.finish_promotion(self.name)
        if self.promoted is None or now < self.promote_at + REPMGR_NOTICES:
            return None
        return self.promoted

    def finish(self) -> int:
        while (status := self.poll()) is None:
            self.world.clock.sleep(0.05)
        return status


class FakeRetrier:
    """release_retry.run_retrier: `release --unless-newer-than TL` over ssh on each node that
    did not confirm, every RETRY_SPACING at most, until it confirms or is primary on a newer
    timeline; stands down once its own node is no longer the primary of TL."""

    def __init__(self, world: FakeCluster, origin: str, timeline: int,
                 nodes: Sequence[str]) -> None:
        self.world = world
        self.origin = origin
        self.timeline = timeline
        self.pending = set(nodes)
        self.next_at = world.clock.now

    def tick(self) -> None:
        world, home = self.world, self.world.hosts[self.origin]
        if home.off:
            self.pending.clear()
        local = world.sql(self.origin, self.origin)
        if local.reachable and (local.in_recovery or (local.timeline or 0) > self.timeline):
            self.pending.clear()
        if not home.user_space or world.clock.now < self.next_at:
            return
        self.next_at = world.clock.now + RETRY_SPACING
        for name in sorted(self.pending):
            host = world.hosts[name]
            if (not host.user_space or host.lock_holder
                    or not world.talks(self.origin, name)):
                continue
            self.pending.discard(name)
            if host.role == "primary" and host.running and host.timeline > self.timeline:
                continue  # newer: left alone (EXIT_STALE)
            if host.vip:
                host.vip = False
                world.event(name, f"released for {self.origin}'s retrier")
            if not host.disk_full:
                host.release_request_at = world.clock.now


class FakeNode:
    """The LocalNode port of one host: its PostgreSQL, repmgr.nodes, repmgr, the retrier."""

    def __init__(self, world: FakeCluster, name: str, retrier: bool = True) -> None:
        self.world = world
        self.name = name
        self.retrier = retrier  # fencing.release_retry_for > 0

    def view(self, timeout: float) -> NodeView:
        return self.world.sql(self.name, self.name)

    def others(self, cached: bool = False) -> list[NodeRecord]:
        if not cached and not self.world.sql(self.name, self.name).reachable:
            raise CommandFailed("cannot read repmgr.nodes: local PostgreSQL does not answer")
        return self.world.records(but=self.name)

    def others_soon(self) -> Future[list[NodeRecord]]:
        """At once, on the caller's thread: the model stays deterministic."""
        future: Future[list[NodeRecord]] = Future()
        try:
            future.set_result(self.others())
        except VipError as exc:
            future.set_exception(exc)
        return future

    def start_promote(self) -> FakePromoteRun:
        return FakePromoteRun(self.world, self.name)

    def start_retrier(self, timeline: int, nodes: Sequence[str]) -> None:
        if nodes and self.retrier:
            self.world.retriers.append(FakeRetrier(self.world, self.name, timeline, nodes))

    def release_replica(self) -> None:
        pass

    def checkpoint(self) -> None:
        pass


@contextmanager
def quiet_log() -> Iterator[None]:
    """Thousands of simulated cycles: log only what would fail a test."""
    level = LOG.level
    LOG.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        LOG.setLevel(level)


REPMGR_CONF = """\
node_id={node_id}
node_name='{name}'
conninfo='host={name} user=repmgr dbname=repmgr connect_timeout=2'
data_directory='{datadir}'
reconnect_attempts=2
reconnect_interval=2
"""


def write_configs(directory: Path, names: Sequence[str], extra: str = "",
                  lease: float = 0, fencing: str = "") -> dict[str, Config]:
    """One repmgr.conf and repmgr-vip.toml per node under `directory`, loaded; `extra` goes
    at the end (after [daemon]), `lease` is vip.lease, `fencing` more lines of [fencing]."""
    configs = {}
    for i, name in enumerate(names):
        base = directory / name
        (base / "data").mkdir(parents=True, exist_ok=True)
        (base / "repmgr.conf").write_text(REPMGR_CONF.format(node_id=i + 1, name=name,
                                                             datadir=base / "data"))
        (base / "repmgr-vip.toml").write_text(
            f'repmgr_config = "{base / "repmgr.conf"}"\nstate_dir = "{base}"\n'
            '[vip]\naddress = "192.0.2.115/24"\ninterface = "lo"\n'
            + (f'lease = {lease}\n' if lease else '')
            + '[fencing]\nfence_command = "/bin/false {node_name}"\n' + fencing
            + '[daemon]\ninterval = 1.0\nmetrics_port = 0\n' + extra)
        configs[name] = load_config(base / "repmgr-vip.toml", check_host=False)
    return configs
