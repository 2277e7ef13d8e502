"""Take the VIP away from every other node before this one may hold it.

SSH releases go to all other registered nodes at once while this node probes ARP in a loop.
Silence on ARP proves that no host on the segment holds the VIP, so a dead host (SSH hanging
until its timeout) does not delay the handover; the SSH sessions still running are left to
finish on their own, which covers a host that was only cut off the wire. If the VIP still
answers when every session has ended, the configured fence_command runs (for example an IPMI
power-off), and only silence after that lets the caller proceed.
"""

from __future__ import annotations

import math
import re
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from repmgr_vip.adapters import early
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.process import first_line, run
from repmgr_vip.adapters.remote import remote_vip_command, ssh_argv, start_remote
from repmgr_vip.adapters.system import SYSTEM_CLOCK
from repmgr_vip.app.lease import EXPIRY_LATE, await_expiry, lease_seconds, wait_budget
from repmgr_vip.config.schema import Config, keep_while_down
from repmgr_vip.core.errors import CommandFailed, VipError
from repmgr_vip.core.model import NodeRecord
from repmgr_vip.core.ports import (
    Clock,
    FenceRunner,
    PreparingRelease,
    ProberFactory,
    RemoteRelease,
    VipAddress,
)
from repmgr_vip.core.ports import Prober as ProberPort
from repmgr_vip.core.ports import ReleaseSession as RemoteSession

if TYPE_CHECKING:
    from concurrent.futures import Future

IN_USE_RETRY = 0.05
# how often a round looks at its sessions and probes: the VIP is on no node between the old
# holder's confirmation and the add, so on the real clock it looks every millisecond (a model
# on a fake clock looks every 5 ms: the same decisions in fewer steps)
WAIT_POLL = 0.005
WAIT_POLL_REAL = 0.001
# a prior proof (the daemon's, taken before this round) counts if it ended this recently: a
# host outside the cluster that starts answering within this window is found by the holder's
# conflict probe afterwards, not before the add
PRIOR_FRESH = 0.5
# (when it ended, monotonic; the MACs that answered): a proof the daemon took just before
PriorProof = tuple[float, tuple[str, ...]]
# with warm links, the old primary (the likely holder) is asked once every other node has
# confirmed, or this long after the round began, whichever comes first: it releases just
# before the add instead of while the slowest link answers, and no node answers for the VIP
# only for its own round trip (the dark window, into which a client's SYN falls unanswered)
HOLDER_LAST = 0.05
# a hook without a daemon asks over fresh ssh (half a second each on a small host): the old
# primary first and alone, the others once it answered (or this long into the round), so
# that its release does not wait behind every other node's ssh start (late_prior)
HOLDER_FIRST_SSH = 1.0
# once the VIP is up, how long the releases asked after the round (over ssh: half a second or
# more) are waited for before the nodes still silent go to the release retrier: it would ask
# them again, over ssh, while PostgreSQL promotes (a node cut off takes ConnectTimeout, 3 s)
SETTLE_WAIT = 2.0


def hook_round(complete_proofs: bool) -> dict[str, Any]:
    """A hook's Fencing options: when its network's proofs are complete (the root helper's
    LAN proof), the old primary first, the round's first proof as the prior (late_prior)."""
    return {"late_prior": True, "holder_last": HOLDER_FIRST_SSH} if complete_proofs else {}


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

    @property
    def unconfirmed(self) -> list[str]:
        """Nodes that did not confirm their release: a returning one may still hold the VIP."""
        return sorted({*self.failed, *self.pending} - set(self.released))

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


_PLACEHOLDER = re.compile(r"\{(node_name|node_id|host)\}")


def fence_command_argv(template: str, node: NodeRecord) -> list[str]:
    """Splits the template into words first, then fills placeholders in one pass.

    No shell ever sees data, and a value that itself looks like a placeholder (a node named
    "{host}") stays as it is.
    """
    values = {"node_name": node.node_name, "node_id": str(node.node_id), "host": node.host}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], word)
            for word in shlex.split(template)]


def _run_fence_command(config: Config, node: NodeRecord) -> bool:
    argv = fence_command_argv(config.fencing.fence_command, node)
    # only the program: the arguments may carry a password (an IPMI fence agent's -P)
    LOG.warning("running fence_command for node %s: %s ...", node.node_name, argv[0])
    try:
        result = run(argv, timeout=config.fencing.fence_timeout)
    except VipError as exc:
        LOG.error("fence_command for %s failed: %s", node.node_name, exc)
        return False
    if result.returncode != 0:
        LOG.error("fence_command for %s exited %d: %s", node.node_name, result.returncode,
                  first_line(result.stderr) or first_line(result.stdout))
    return result.returncode == 0


class Prober(threading.Thread):
    """Probes ARP for the VIP again and again in the background, keeping every result."""

    def __init__(self, network: VipAddress) -> None:
        super().__init__(daemon=True, name="arp-prober")
        self.network = network
        self.stopped = threading.Event()
        self.changed = threading.Condition()
        # (started, finished, answered); answered None: the probe itself failed
        self.results: list[tuple[float, float, tuple[str, ...] | None]] = []
        self.complete: list[bool] = []  # per result: every answer in its window was heard

    def run(self) -> None:
        while not self.stopped.is_set():
            started = time.monotonic()
            answered: tuple[str, ...] | None
            complete = False
            try:
                result = self.network.probe()
                answered, complete = result.answered_by, result.complete
            except VipError as exc:
                LOG.error("ARP probe failed: %s", exc)
                answered = None
            with self.changed:
                self.results.append((started, time.monotonic(), answered))
                self.complete.append(complete)
                self.changed.notify_all()
            if answered or answered is None:
                self.stopped.wait(IN_USE_RETRY)

    def complete_before(self, moment: float) -> tuple[str, ...] | bool | None:
        """The answers of the latest complete proof that started before `moment`; False if
        the first proof that ended was not complete (none ever will be: a helper that failed,
        arping instead); None while none has ended yet."""
        with self.changed:
            if self.complete and not self.complete[0]:
                return False
            found: tuple[str, ...] | None = None
            for (started, _, answered), complete in zip(self.results, self.complete,
                                                        strict=True):
                if complete and answered is not None and started < moment:
                    found = answered
            return found

    def result_since(self, since: float, timeout: float) -> tuple[str, ...] | None:
        """Who answers, judged by probes that ended after `since`; None if none came in time.

        Silence in a probe that ended after `since` proves the VIP free (a holder's kernel
        answers at once); an answer counts only from a probe that also started after it.
        """
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for started, finished, answered in self.results:
                    if finished < since or answered is None:
                        continue
                    if answered == () or started >= since:
                        return answered
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.is_alive():
                    return None
                self.changed.wait(remaining)

    def latest(self) -> tuple[str, ...] | None:
        with self.changed:
            return self.results[-1][2] if self.results else None

    def stop(self) -> None:
        self.stopped.set()


def holder_wait(config: Config) -> float:
    """Seconds from the start of fencing that an unconfirmed holder may take to let go by
    itself (0: it never does; see Fencing._await_lease)."""
    lease = wait_budget(config) if lease_seconds(config) else 0.0
    keep = keep_while_down(config)
    return max(lease, keep + EXPIRY_LATE if keep else 0.0)


class SshRelease:
    """The real RemoteRelease: `repmgr-vip release` on the node, over ssh, in the background."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.early: list[str] = []  # nodes whose release the quick start had sent already

    def _remote_argv(self, node: NodeRecord) -> list[str]:
        return remote_vip_command(self.config, node.node_name, node.node_id, "release")

    def start_release(self, node: NodeRecord) -> RemoteSession:
        session = start_remote(self.config, node.host, self._remote_argv(node))
        if session.early:
            self.early.append(node.node_name)
        return session

    def command_line(self, node: NodeRecord) -> list[str]:
        """The whole ssh command line start_release runs for node."""
        return ssh_argv(self.config, node.host, self._remote_argv(node))


def keep_first_releases(config: Config, others: Sequence[NodeRecord]) -> None:
    """Puts on disk what the promote hook's quick start may send before the full CLI has
    loaded (adapters/early.py): the release on each node the list names primary, the one a
    hook's round asks first; exactly SshRelease's command line, or the round does not adopt
    it. OSError if it cannot be written (a full disk): the hook then starts it itself."""
    release = SshRelease(config)
    early.write_plan(config.state_dir, config.path, [
        release.command_line(node) for node in others
        if node.node_type == "primary" and node.host])


class Fencing:
    """A fencing round: remote releases over SSH racing an ARP prober.

    The ports default to the real ssh, fence_command, clock and prober thread.
    """

    def __init__(self, config: Config, network: VipAddress, nodes: Sequence[NodeRecord], *,
                 remote: RemoteRelease | None = None, clock: Clock | None = None,
                 fence_runner: FenceRunner | None = None,
                 prober: ProberFactory | None = None,
                 prior_proof: Callable[[], PriorProof | None] | None = None,
                 holder_last: float = 0.0, late_prior: bool = False) -> None:
        self.config = config
        self.network = network
        self.nodes = list(nodes)
        self.remote = remote if remote is not None else SshRelease(config)
        self.clock = clock if clock is not None else SYSTEM_CLOCK
        self.fence_runner = fence_runner or (lambda node: _run_fence_command(config, node))
        self.proof_pending = False  # wait() returned on confirmations before any probe ended
        self.started = self.clock.monotonic()
        self.prior = self._fresh(prior_proof() if prior_proof is not None else None)
        self.confirmed_macs: set[str] = set()  # the interfaces the confirming nodes released
        self.report = FenceReport()
        self.confirmed_at: float | None = None
        self.last_finished = self.started  # when the latest SSH session ended
        self.sessions: dict[str, RemoteSession] = {}
        self.asked: set[str] = set()
        # seconds the old primary's release may wait for the others' (see HOLDER_LAST); 0
        # asks every node at once (ssh exec: each release takes hundreds of milliseconds)
        self.holder_last = holder_last
        # with warm links and a prior proof, the old primary is asked first and alone: its
        # confirmation may free the VIP by itself (_accounted; a silent proof freed it
        # already), and the others' releases (hold markers on nodes that do not answer for
        # the VIP) follow the add instead of competing with it for the CPU (ask_rest)
        # a hook has no proof from before its round: with late_prior (its network's proofs
        # are complete: the root helper's LAN proof) the round's first proof, taken before any
        # node confirmed, serves as one (_take_late_prior), and the old primary is asked first
        # here too: at 7 nodes its release no longer waits behind six fresh ssh connections
        self.late_prior = late_prior and self.prior is None and holder_last > 0
        self.holder_first = holder_last > 0 and (self.prior is not None or self.late_prior)
        self.first_ended: float | None = None  # when the first release was seen to end
        self.deferred: dict[str, NodeRecord] = {}  # not yet asked (see _ask_deferred)
        # the round's thread and a fresh node list's callback (_ask_coming_later) both ask:
        # who is deferred, asked and under way changes under this lock only
        self._asking = threading.RLock()
        self.coming: Future[list[NodeRecord]] | None = None  # the fresh list (expect_soon)
        self.poll = WAIT_POLL_REAL if self.clock is SYSTEM_CLOCK else WAIT_POLL
        self.expect(self.nodes)
        self.prober: ProberPort = prober(network) if prober is not None else Prober(network)
        self.prober.start()

    def expect(self, nodes: Sequence[NodeRecord]) -> None:
        """Sets the nodes that must release (the fresh node list) and asks any not yet asked.

        A hook may start with the cached list and correct it once PostgreSQL answers.
        """
        with self._asking:
            self.nodes = list(nodes)
            for node in self.nodes:
                if node.node_name in self.asked:
                    continue
                self.asked.add(node.node_name)
                if not node.host:
                    self.report.failed.append(node.node_name)
                elif self.holder_first and node.node_type != "primary":
                    self.deferred[node.node_name] = node
                elif (self.holder_last > 0 and not self.holder_first
                      and node.node_type == "primary"):
                    self.deferred[node.node_name] = node
                    if isinstance(self.remote, PreparingRelease):
                        self.remote.prepare(node)
                else:
                    self.sessions[node.node_name] = self.remote.start_release(node)
            self._ask_deferred()

    def expect_soon(self, nodes: Future[list[NodeRecord]]) -> None:
        """The fresh node list, still being read: its nodes are asked as soon as it comes.

        Until it has come, confirmations do not end the round (a node only it names may hold
        the VIP), but ARP silence does: nobody answers, whoever is registered. A list that
        comes after the round is asked all the same (release, hold marker), in its thread."""
        self.coming = nodes

    def _take_coming(self) -> None:
        """Asks the nodes of a fresh list that has come; a failed read raises (VipError)."""
        if self.coming is not None and self.coming.done():
            coming, self.coming = self.coming, None
            self.expect(coming.result())

    def _ask_coming_later(self) -> None:
        """The round ended on ARP silence before the fresh list came: ask its nodes when it
        does (they hold nothing, but keep their daemons from re-adding: the hold marker)."""
        coming, self.coming = self.coming, None
        if coming is None:
            return

        def ask(done: Future[list[NodeRecord]]) -> None:
            try:
                self.expect(done.result())
                self._ask_deferred(now=True)
            except VipError as exc:
                LOG.warning("node list read after the VIP was proven free failed: %s", exc)

        coming.add_done_callback(ask)

    def _ask_deferred(self, *, now: bool = False) -> None:
        """Asks the held-back nodes: the old primary (holder last) once no other release
        is under way; the others (holder first) once the old primary answered and that did
        not free the VIP; either once HOLDER_LAST has passed, or `now`."""
        with self._asking:  # each deferred node asked once, whichever thread gets here
            if not self.deferred:
                return
            ready = not self.sessions
            if self.holder_first:
                ready = ready and not self._accounted()
            if not (now or ready or self.clock.monotonic() - self.started >= self.holder_last):
                return
            deferred, self.deferred = self.deferred, {}
            for name, node in deferred.items():
                self.sessions[name] = self.remote.start_release(node)

    def _collect(self) -> None:
        self._take_coming()
        self._take_late_prior()  # before a release is seen to end: a proof started before
        self._take_finished()
        self._ask_deferred()
        if self.all_confirmed and self.confirmed_at is None:
            self.confirmed_at = self.clock.monotonic()

    @property
    def all_confirmed(self) -> bool:
        """Every other registered node said, over SSH, that the VIP is not on it."""
        released = set(self.report.released)
        return bool(self.nodes) and all(n.node_name in released for n in self.nodes)

    def wait(self, *, confirmations_suffice: bool = False,
             lease_wait: bool = False) -> FenceReport:
        """Returns once ARP shows the VIP free, or (if allowed) every node confirmed release.

        Otherwise waits for every SSH session (bounded by ssh_command_timeout) and then runs
        fence_command for the nodes that did not confirm, and probes again.
        """
        deadline = self.started + self.config.fencing.ssh_command_timeout
        answered: tuple[str, ...] | None = None
        while True:
            self._collect()
            latest = self.prober.latest()
            if latest is None and self.prior == ():
                latest = ()  # nobody answered the daemon's proof a moment ago: the same silence
            if latest == () or (confirmations_suffice and self._accounted()):
                # silence, or every MAC that answered the daemon's proof a moment ago belongs
                # to a node that has now let go (the old holder): the VIP is on no host, so
                # the slower confirmations and the fresh node list are not waited for
                answered = ()
                if not self.holder_first:  # else the caller asks them after the add
                    self._ask_deferred(now=True)
                with self._asking:
                    self.report.pending = sorted(self.sessions)  # they finish on their own
                self._ask_coming_later()
                break
            if self.coming is not None:  # confirmations count against the fresh list only
                if self.clock.monotonic() >= deadline:
                    raise CommandFailed("repmgr.nodes gave no answer within "
                                        f"{self.config.fencing.ssh_command_timeout} s")
                self.clock.sleep(self.poll)
                continue
            if confirmations_suffice and self.all_confirmed:
                answered = latest if latest is not None else self._unaccounted()
                break
            if not self.sessions:
                # judge by a probe that saw the segment after the last release took effect
                answered = self._proof(self.last_finished)
                break
            if self.clock.monotonic() >= deadline:
                for name, session in self.sessions.items():
                    session.kill()
                    self.report.failed.append(name)
                    LOG.warning("node %s: no answer over SSH within %d s", name,
                                self.config.fencing.ssh_command_timeout)
                self.sessions.clear()
                answered = self._proof(self.clock.monotonic())
                break
            self.clock.sleep(self.poll)
        self.proof_pending = answered is None
        self.report.answered_by = answered or ()
        # only a node that did not confirm its release can be the one answering: a node that
        # confirmed is never fenced, whoever else (a stray host, a spoofer) answers for the VIP
        suspects = [n for n in self.nodes if n.node_name not in self.report.released]
        if answered and suspects and self.config.fencing.fence_command:
            for node in suspects:
                if self.fence_runner(node):
                    self.report.fenced.append(node.node_name)
            fenced_at = self.clock.monotonic()
            self.report.answered_by = self._proof(fenced_at)
        if lease_wait and self.report.answered_by and not (
                confirmations_suffice and self.all_confirmed):
            self.report.answered_by = self._await_lease(self.report.answered_by)
        self.report.seconds = self.clock.monotonic() - self.started
        return self.report

    def _fresh(self, prior: PriorProof | None) -> tuple[str, ...] | None:
        """The answers of a proof that ended at most PRIOR_FRESH before this round, else None."""
        if prior is None:
            return None
        ended, answered = prior
        return answered if self.started - ended <= PRIOR_FRESH else None

    def _accounted(self) -> bool:
        """Every MAC that answered for the VIP in the daemon's proof taken just before this
        round belongs to a node that has confirmed its release: the VIP is free without
        waiting for another probe, nor for the nodes that did not answer (they hold nothing,
        or they would have answered). This lets the old holder keep the VIP until the very
        moment it is asked for it, and the add follow its confirmation at once, whatever the
        slowest link (a probe of this round could have started after a confirmation, and an
        answer then is a holder: those are judged as before)."""
        if not self.prior:
            return False
        return {mac.lower() for mac in self.prior} <= self.confirmed_macs

    def _take_late_prior(self) -> None:
        """A hook's round (late_prior): the latest complete proof that started before the
        first release was seen to end serves as the prior proof (_accounted). One that started
        later could hear a node that said it released and still answers: that is judged by a
        proof after the confirmations, as before. No complete proof at all: every node is
        asked at once, as without a prior."""
        if not self.late_prior:
            return
        moment = self.first_ended if self.first_ended is not None else math.inf
        found = self.prober.complete_before(moment)
        if found is False or (found is None and self.first_ended is not None):
            self.late_prior = False  # none came in time: the others are asked now
            self._ask_deferred(now=True)
        elif isinstance(found, tuple):
            self.prior = found
            self.late_prior = False

    def ask_rest(self) -> None:
        """Asks the nodes the round did not need (holder first): once the VIP is up. Safe
        to call more than once."""
        self._ask_deferred(now=True)

    def _take_finished(self) -> None:
        """Moves every finished release into the report: released (with its MACs) or failed."""
        with self._asking:
            for name, session in list(self.sessions.items()):
                if not session.finished():
                    continue
                result = session.result()
                del self.sessions[name]
                self.last_finished = self.clock.monotonic()
                if self.first_ended is None:
                    self.first_ended = self.last_finished
                if result.ok:
                    self.report.released.append(name)
                    self.confirmed_macs.update(mac.lower() for mac in result.macs)
                    LOG.info("node %s: %s", name, _last_line(result.stdout) or "released")
                else:
                    self.report.failed.append(name)
                    LOG.warning("node %s: remote release failed (exit %d): %s", name,
                                result.returncode, _last_line(result.stdout))

    def settle(self, wait: float = 0.0) -> FenceReport:
        """The report with the confirmations that came after the round ended (it ends on
        the holder's, the others' follow within a round trip; over fresh ssh, half a second
        or more: `wait` up to that long for releases still under way): only the nodes still
        silent go to the release retrier."""
        deadline = self.clock.monotonic() + wait
        while True:
            with self._asking:
                self._take_finished()
                running = bool(self.sessions)
            if not running or self.clock.monotonic() >= deadline:
                break
            self.clock.sleep(self.poll)
        with self._asking:
            # asked after the round (ask_rest) or never asked: not confirmed either
            self.report.pending = sorted({*self.report.pending, *self.sessions,
                                          *self.deferred})
        return self.report

    def _unaccounted(self) -> tuple[str, ...] | None:
        """MACs of the prior proof that no confirming node released: a host outside the
        cluster answered a moment ago, so the promotion waits for a probe taken after the
        confirmations (and is refused if it still answers) instead of starting on them."""
        if self.prior is None:
            return None
        foreign = tuple(m for m in self.prior if m.lower() not in self.confirmed_macs)
        return foreign or None

    def _await_lease(self, answered: tuple[str, ...]) -> tuple[str, ...]:
        """A node that neither released nor was fenced may still let go on its own: with
        vip.lease its kernel expires the VIP (a frozen holder); with daemon.keep_while_down
        its daemon drops it once its dead PostgreSQL has been down that long (a holder SSH
        cannot reach). Wait for ARP silence that long from the start of fencing."""
        done = set(self.report.released) | set(self.report.fenced)
        silent = [n.node_name for n in self.nodes if n.node_name not in done]
        budget = holder_wait(self.config)
        if not budget or not silent:
            return answered
        deadline = self.started + budget
        LOG.warning("VIP still answers from %s and %s neither released nor was fenced: "
                    "waiting up to %.1f s more for it to let go (vip.lease %d s, "
                    "daemon.keep_while_down %g s)", ", ".join(answered), ",".join(silent),
                    deadline - self.clock.monotonic(), lease_seconds(self.config),
                    keep_while_down(self.config))
        window = math.ceil(self.config.vip.probe_timeout) * self.config.vip.probe_count + 10
        return await_expiry(self.prober.result_since, answered, deadline, window,
                            self.clock.monotonic)

    def _proof(self, since: float) -> tuple[str, ...]:
        timeout = math.ceil(self.config.vip.probe_timeout) * self.config.vip.probe_count + 10
        answered = self.prober.result_since(since, timeout)
        return answered if answered is not None else ("unknown (probe failed)",)

    def proven_free(self) -> tuple[str, ...]:
        """Who answers ARP once every node confirmed its release (blocks for a probe that
        ended after that moment; see Prober.result_since)."""
        since = self.confirmed_at if self.confirmed_at is not None else self.started
        return self._proof(since)

    @property
    def early(self) -> list[str]:
        """Nodes whose release the promote hook's quick start had sent before the round."""
        return list(self.remote.early) if isinstance(self.remote, SshRelease) else []

    def close(self) -> None:
        self.ask_rest()  # whatever happened, every node is asked to release (hold markers)
        self.prober.stop()


def fence_others(config: Config, network: VipAddress, nodes: Sequence[NodeRecord],
                 **ports: Any) -> FenceReport:
    """Fences and waits for proof: ARP silence, or fence_command followed by ARP silence.

    `ports` go to Fencing (remote, clock, fence_runner, prober)."""
    fencing = Fencing(config, network, nodes, **ports)
    try:
        return fencing.wait()
    finally:
        fencing.close()
