"""vip.lease: command lines, sudoers, validation, the renewal guard and the fencing wait."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from repmgr_vip.adapters.network import PrivilegedCommands
from repmgr_vip.app import lease
from repmgr_vip.app.lease import LeaseKeeper, await_expiry, lease_checks, unrenewed_warning
from repmgr_vip.cli.main import main
from repmgr_vip.config.schema import Config, load_config
from repmgr_vip.core.decide import Action, Decision
from repmgr_vip.core.errors import CommandFailed, ExitCode

LEASED = "\n[vip]\naddress = \"192.0.2.115/24\"\ninterface = \"lo\"\nlease = {lease}\n"


def _config(write_config: Callable[..., Path], repmgr_conf: Path, lease_value: str,
            extra: str = "") -> Path:
    return write_config(f'repmgr_config = "{repmgr_conf}"\n'
                        + LEASED.format(lease=lease_value) + extra)


def test_leased_add_renew_and_sudoers_lines(
    write_config: Callable[..., Path], repmgr_conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(write_config, repmgr_conf, "4.2")
    commands = PrivilegedCommands.from_config(load_config(path))
    assert commands.add()[-4:] == ["valid_lft", "5", "preferred_lft", "5"]
    assert commands.renew()[1:] == ["-4", "address", "change", "192.0.2.115/24", "dev", "lo",
                                    "valid_lft", "5", "preferred_lft", "5"]
    assert commands.renew() in commands.all() and len(commands.all()) == 7
    assert main(["-c", str(path), "sudoers"]) == 0
    rules = capsys.readouterr().out
    for argv in commands.all():
        assert " ".join(argv) in rules
    assert "*" not in rules.replace("# ", "")


def test_no_lease_keeps_the_permanent_lines(write_config: Callable[..., Path]) -> None:
    commands = PrivilegedCommands.from_config(load_config(write_config()))
    assert "valid_lft" not in commands.add()
    assert len(commands.all()) == 6


@pytest.mark.parametrize("bad", ["-1", "inf", "nan", "1e9", '"4"', "true"])
def test_bad_lease_is_rejected(write_config: Callable[..., Path], repmgr_conf: Path,
                               capsys: pytest.CaptureFixture[str], bad: str) -> None:
    path = _config(write_config, repmgr_conf, bad)
    assert main(["-c", str(path), "sudoers"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "vip.lease" in err and len(err.strip().splitlines()) == 1


# --- the fencing wait ---------------------------------------------------------------------


class FakeArp:
    """A prober whose holder's kernel expires the VIP at `expires_at` (fake seconds)."""

    def __init__(self, expires_at: float, probe: float = 0.3) -> None:
        self.now = 0.0
        self.expires_at = expires_at
        self.probe = probe

    def clock(self) -> float:
        return self.now

    def result_since(self, since: float, timeout: float) -> tuple[str, ...] | None:
        self.now = max(self.now, since) + self.probe
        return ("aa:bb:cc:dd:ee:01",) if self.now < self.expires_at else ()


def test_lease_wait_returns_once_the_vip_expires() -> None:
    arp = FakeArp(expires_at=5.0)
    answered = await_expiry(arp.result_since, ("aa:bb:cc:dd:ee:01",), 10.0, 1.0, arp.clock)
    assert answered == ()
    assert 5.0 <= arp.now < 5.5


def test_lease_wait_refuses_when_it_still_answers_after_the_deadline() -> None:
    arp = FakeArp(expires_at=math.inf)
    answered = await_expiry(arp.result_since, ("aa:bb:cc:dd:ee:01",), 6.0, 1.0, arp.clock)
    assert answered == ("aa:bb:cc:dd:ee:01",)
    assert arp.now >= 6.0


def test_lease_wait_with_a_failing_prober_is_not_a_proof() -> None:
    answered = await_expiry(lambda since, timeout: None, ("m",), 6.0, 1.0, lambda: 0.0)
    assert answered  # unknown: refused


# --- the daemon's renewal ---------------------------------------------------------------


class FakeNetwork:
    def __init__(self, clock: list[float], renew_takes: float = 0.02, fail: bool = False):
        self.clock = clock
        self.renew_takes = renew_takes
        self.fail = fail
        self.renewed = 0
        self.removed = 0

    def renew(self) -> None:
        self.clock[0] += self.renew_takes
        if self.fail:
            raise CommandFailed("sudo: a password is required")
        self.renewed += 1

    def remove(self) -> bool:
        self.removed += 1
        return True


class FakeMetrics:
    def __init__(self) -> None:
        self.failures = 0
        self.remaining: list[float] = []

    def lease_remaining(self, seconds: float) -> None:
        self.remaining.append(seconds)

    def lease_failure(self) -> None:
        self.failures += 1


HOLD = Decision(Action.KEEP, "holding: primary")


def _keeper(config: Config, network: FakeNetwork, clock: list[float],
            metrics: FakeMetrics) -> LeaseKeeper:
    return LeaseKeeper(config, network, metrics, clock=lambda: clock[0])  # type: ignore[arg-type]


@pytest.fixture
def leased(write_config: Callable[..., Path], repmgr_conf: Path) -> Config:
    return load_config(_config(write_config, repmgr_conf, "4"))


def test_renews_a_held_vip_and_not_a_released_one(
    leased: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    network, metrics = FakeNetwork(clock), FakeMetrics()
    monkeypatch.setattr(lease, "read_lifetime", lambda config: 3.0)
    keeper = _keeper(leased, network, clock, metrics)
    for _ in range(3):
        keeper.tick(HOLD)
        clock[0] += 1.0
    assert network.renewed == 3 and network.removed == 0 and metrics.failures == 0
    keeper.tick(Decision(Action.RELEASE, "standby"))
    assert network.renewed == 3
    assert metrics.remaining == [3.0, 3.0, 3.0]


def test_absent_vip_is_never_renewed(leased: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """A renewal would re-create it: IPv4 `ip address change` adds a missing address."""
    clock = [100.0]
    network, metrics = FakeNetwork(clock), FakeMetrics()
    monkeypatch.setattr(lease, "read_lifetime", lambda config: None)
    _keeper(leased, network, clock, metrics).tick(HOLD)
    assert network.renewed == 0 and metrics.remaining == [0.0]


def test_stall_shorter_than_the_lease_keeps_the_vip(
    leased: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    network, metrics = FakeNetwork(clock), FakeMetrics()
    monkeypatch.setattr(lease, "read_lifetime", lambda config: 4.0)
    keeper = _keeper(leased, network, clock, metrics)
    keeper.tick(HOLD)  # renewed at 100: expires no earlier than 104
    clock[0] += 1.0
    monkeypatch.setattr(lease, "read_lifetime", lambda config: 3.0)
    network.renew_takes = 2.0  # stopped for half the lease between the read and the renewal
    keeper.tick(HOLD)
    assert network.removed == 0 and metrics.failures == 0


def test_renewal_after_a_stall_longer_than_the_lease_removes_the_vip(
    leased: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    network, metrics = FakeNetwork(clock, renew_takes=30.0), FakeMetrics()
    monkeypatch.setattr(lease, "read_lifetime", lambda config: 3.0)
    _keeper(leased, network, clock, metrics).tick(HOLD)
    assert network.removed == 1 and metrics.failures == 1


def test_failed_renewal_is_counted(leased: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    network, metrics = FakeNetwork(clock, fail=True), FakeMetrics()
    monkeypatch.setattr(lease, "read_lifetime", lambda config: 3.0)
    _keeper(leased, network, clock, metrics).tick(HOLD)
    assert metrics.failures == 1 and network.removed == 0


def test_no_lease_never_renews(write_config: Callable[..., Path],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    network, metrics = FakeNetwork(clock), FakeMetrics()
    monkeypatch.setattr(lease, "read_lifetime", lambda config: math.inf)
    _keeper(load_config(write_config()), network, clock, metrics).tick(HOLD)
    assert network.renewed == 0


# --- check and start-repmgrd ------------------------------------------------------------


def _warnings(config: Config) -> list[str]:
    return [r.name for r in lease_checks(config) if r.warning]


def test_checks_size_the_lease(write_config: Callable[..., Path], repmgr_conf: Path) -> None:
    # repmgr.conf: 3 attempts x 2 s = 6 s detection; daemon period 1 s; no daemon running
    assert _warnings(load_config(write_config())) == []
    assert _warnings(load_config(_config(write_config, repmgr_conf, "4"))) == [
        "vip.lease daemon"]
    assert _warnings(load_config(_config(write_config, repmgr_conf, "2"))) == [
        "vip.lease", "vip.lease daemon"]
    assert _warnings(load_config(_config(write_config, repmgr_conf, "10"))) == [
        "vip.lease", "vip.lease daemon"]


def test_start_repmgrd_warning_needs_a_lease(write_config: Callable[..., Path],
                                            repmgr_conf: Path) -> None:
    assert unrenewed_warning(load_config(write_config())) is None
    assert unrenewed_warning(load_config(_config(write_config, repmgr_conf, "4")))
