"""The VIP as a lease: an address the kernel itself removes unless the daemon keeps renewing it.

With `[vip] lease = N` the VIP is added with `valid_lft N preferred_lft N`, and the daemon
extends it (`ip address change ... valid_lft N`) every cycle in which it does not decide to
release. If the node freezes (every process stopped, a hung user space), nobody renews and the
kernel drops the address after at most N seconds: the node fences itself, so a promotion need
not refuse while the old holder cannot be reached or powered off. It only waits out the lease.

Two kernel facts shape this module (checked on iproute2 6.1, Linux 6.x):

- For IPv4 the kernel ignores the missing NLM_F_CREATE flag: `ip address change` and
  `ip address replace` both CREATE an address that is not there. A renewal sent after the
  address expired would resurrect it. So the keeper renews only an address it has just seen,
  under the node's VIP lock (no release can slip in between), and if the renewal itself
  finished so late that the address may have expired first (the process was stopped in
  between), it removes the VIP at once instead of trusting it.
- `ip -j address` shows `valid_life_time` in whole seconds, the age rounded down (so the true
  remaining time is more than the shown value minus one), and 4294967295 for "forever".

Limits: the kernel that answers ARP for the VIP is the one that expires it. A paused virtual
machine keeps its clock stopped and answers again on resume until the lease runs out there; a
hung kernel neither expires nor (usually) answers. Every node must run the daemon, or the VIP
a hook added vanishes after N seconds; that is why the default is 0 (a permanent address).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from repmgr_vip.adapters import rtnl
from repmgr_vip.adapters.lock import LockBusy, vip_lock
from repmgr_vip.adapters.log import LOG
from repmgr_vip.adapters.process import run
from repmgr_vip.config.schema import Config
from repmgr_vip.core.decide import Action, Decision
from repmgr_vip.core.errors import VipError

if TYPE_CHECKING:
    from repmgr_vip.app.metrics import Metrics
    from repmgr_vip.core.model import CheckResult
    from repmgr_vip.core.ports import LeasedAddress

FOREVER = 0xFFFFFFFF
# the kernel removes an expired address up to ~0.2 s late here (allow 2 s), and never more
# than a few tens of milliseconds early (ADDRCONF_TIMER_FUZZ_MINUS)
EXPIRY_LATE = 2.0
EXPIRY_EARLY = 0.1
LOCK_WAIT = 0.2
MIN_PERIODS = 3


def lease_seconds(config: Config) -> int:
    """The lifetime given to the kernel: vip.lease rounded up to whole seconds (0: none)."""
    return math.ceil(config.vip.lease)


def read_lifetime(config: Config) -> float | None:
    """Seconds the VIP has left as the kernel shows them: inf if permanent, None if not held.

    Over rtnetlink in-process (asked every cycle on every node), `ip -j` if that fails.
    """
    iface = config.vip.interface
    with contextlib.suppress(OSError):
        return rtnl.valid_lifetime(iface, config.vip.ip, timeout=5.0)
    result = run([config.commands.ip, "-j", "-4", "address", "show", "dev", iface], timeout=5.0)
    if result.returncode != 0:
        return None
    try:
        links = json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        return None
    for link in links:
        for info in link.get("addr_info", []):
            if info.get("family") == "inet" and info.get("local") == config.vip.ip:
                valid = int(info.get("valid_life_time", FOREVER))
                return math.inf if valid >= FOREVER else float(valid)
    return None


class LeaseKeeper:
    """Renews the VIP's lease once per daemon cycle while the daemon does not release it.

    `lifetime` (read_lifetime) and `lock` (the node's VIP lock) default to the host's; the
    model of the cluster passes fakes on a fake clock (repmgr_vip.testing).
    """

    def __init__(self, config: Config, network: LeasedAddress, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, *,
                 lifetime: Callable[[], float | None] | None = None,
                 lock: Callable[[float], AbstractContextManager[None]] | None = None) -> None:
        self.config = config
        self.network = network
        self.metrics = metrics
        self.clock = clock
        self.lifetime = lifetime or (lambda: read_lifetime(config))
        self.lock = lock or (lambda timeout: vip_lock(config.lock_path, timeout))
        self.lease = lease_seconds(config)
        self.renewed_at: float | None = None  # start of our last successful renewal
        self.checked_permanent = False

    def tick(self, decision: Decision) -> None:
        """After a cycle acted: renew a held VIP unless the decision was to let it go."""
        if decision.action is Action.RELEASE:
            self.renewed_at = None
            return
        if not self.lease:
            self._check_permanent()
            return
        try:
            if self.lifetime() is None:  # not held: nothing to renew, no lock
                self.renewed_at = None
                if self.metrics is not None:
                    self.metrics.lease_remaining(0.0)
                return
            with self.lock(LOCK_WAIT):
                self._renew_locked()
        except LockBusy:
            LOG.info("lease: another repmgr-vip action is running; renewing next cycle")
        except VipError as exc:
            self._failed(f"lease renewal failed: {exc}")

    def _renew_locked(self) -> None:
        seen_at = self.clock()
        left = self.lifetime()
        if self.metrics is not None:
            self.metrics.lease_remaining(0.0 if left is None else left)
        if left is None:
            self.renewed_at = None
            return
        # the kernel drops the address no earlier than this (monotonic seconds)
        expires = seen_at + left - 1 if math.isfinite(left) else math.inf
        if self.renewed_at is not None:
            expires = max(expires, self.renewed_at + self.lease)
        started = self.clock()
        self.network.renew()
        if self.clock() >= expires - EXPIRY_EARLY:
            # stopped between seeing the address and renewing it, for longer than it had
            # left: the renewal may have re-created an expired address. Never trust that.
            self.renewed_at = None
            removed = self.network.remove()
            self._failed("lease renewal came too late (this process was stalled); "
                         + ("removed the VIP it may have re-created" if removed
                            else "VIP not held"))
            return
        self.renewed_at = started

    def _check_permanent(self) -> None:
        """Once: a VIP left with a lifetime after vip.lease was set back to 0 would expire."""
        if self.checked_permanent:
            return
        left = self.lifetime()
        if left is None:
            return
        self.checked_permanent = True
        if math.isfinite(left):
            LOG.warning("the VIP expires in %g s but vip.lease = 0, so nobody renews it; "
                        "release and acquire it once to make it permanent", left)

    def _failed(self, message: str) -> None:
        LOG.error("%s", message)
        if self.metrics is not None:
            self.metrics.lease_failure()


def await_expiry(result_since: Callable[[float, float], tuple[str, ...] | None],
                 answered: tuple[str, ...], deadline: float, probe_window: float,
                 clock: Callable[[], float] = time.monotonic) -> tuple[str, ...]:
    """Probes until ARP goes silent or `deadline` passes; who still answers after it.

    `result_since(since, timeout)` is Prober.result_since. Past the deadline only a probe
    that started after it can keep the VIP counted as held.
    """
    while answered and clock() < deadline:
        got = result_since(clock(), max(0.0, deadline - clock()) + probe_window)
        if got is None:
            break
        answered = got
    if answered:
        final = result_since(max(deadline, clock()), probe_window)
        answered = final if final is not None else ("unknown (probe failed)",)
    return answered


def wait_budget(config: Config) -> float:
    """How long after fencing started a frozen holder's VIP may still answer."""
    return lease_seconds(config) + EXPIRY_LATE


def unrenewed_warning(config: Config) -> str | None:
    """A loud line when the lease is set but no daemon runs here to renew it."""
    from repmgr_vip.app.daemon import daemon_pid

    if not lease_seconds(config) or daemon_pid(config) is not None:
        return None
    return (f"WARNING: vip.lease = {config.vip.lease:g} s but no repmgr-vip daemon runs on "
            "this node: a VIP added here expires after that; start `repmgr-vip daemon` "
            "or set vip.lease = 0")


def lease_checks(config: Config) -> Iterator[CheckResult]:
    """`check` lines for the lease: off, or its sizing against the daemon and repmgr."""
    from repmgr_vip.core.model import CheckResult

    lease = lease_seconds(config)
    if not lease:
        yield CheckResult("vip.lease", True, "0 (a permanent address)")
        return
    period = config.daemon.interval
    detection = config.repmgr.reconnect_attempts * config.repmgr.reconnect_interval
    detail = (f"{lease} s; daemon period {period:g} s, repmgr detects a failed primary after "
              f"{detection} s (reconnect_attempts x reconnect_interval)")
    if lease < MIN_PERIODS * period:
        yield CheckResult("vip.lease", True, detail + f": shorter than {MIN_PERIODS} daemon "
                          "periods, a loaded daemon may let the VIP lapse; make it longer",
                          warning=True)
    elif lease > detection:
        yield CheckResult("vip.lease", True, detail + ": longer than repmgr's detection, a "
                          "frozen primary delays the promotion until its lease ends; make it "
                          "shorter", warning=True)
    else:
        yield CheckResult("vip.lease", True, detail)
    note = unrenewed_warning(config)
    if note:
        yield CheckResult("vip.lease daemon", True, note.removeprefix("WARNING: "),
                          warning=True)
