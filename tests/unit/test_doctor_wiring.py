"""`check`'s wiring items without a cluster: hook lines, VIP subnet, parsing `check` output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from repmgr_vip.adapters.network import InterfaceState
from repmgr_vip.app.doctor import _check_hook_lines, _check_subnet, _parse_check_output
from repmgr_vip.app.hooks import repmgr_conf_lines
from repmgr_vip.config.schema import load_config


class FakeNetwork:
    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    def interface_state(self) -> InterfaceState:
        return InterfaceState(True, True, "02:00:00:00:00:01", self.addresses)


def _status(results: list[Any]) -> dict[str, str]:
    return {r.name: r.line().split()[0] for r in results}


def test_hook_lines_as_printed_pass_and_missing_ones_fail(
        write_config: Callable[..., Path], repmgr_conf: Path) -> None:
    config = load_config(write_config())
    base = repmgr_conf.read_text()
    assert "FAIL" in _status(list(_check_hook_lines(config))).values()  # nothing wired yet
    repmgr_conf.write_text(base + repmgr_conf_lines(config))
    assert set(_status(list(_check_hook_lines(config))).values()) == {"ok"}
    wired = base + repmgr_conf_lines(config)
    repmgr_conf.write_text("\n".join(line for line in wired.splitlines()
                                     if not line.startswith("promote_command")))
    status = _status(list(_check_hook_lines(config)))
    assert status["repmgr.conf promote_command"] == "FAIL"
    assert list(status.values()).count("FAIL") == 1


def test_a_promote_line_without_the_control_socket_works_and_is_a_warning(
        write_config: Callable[..., Path], repmgr_conf: Path) -> None:
    """A line written by an older repmgr-vip: promote works (the full CLI asks the daemon),
    only the quick start is lost; `check` says so without failing."""
    config = load_config(write_config())
    wired = repmgr_conf_lines(config)
    old = "\n".join(line.split(" --control ")[0] + "'" if line.startswith("promote_command")
                    else line for line in wired.splitlines())
    assert old != wired
    repmgr_conf.write_text(repmgr_conf.read_text() + old + "\n")
    results = {r.name: r for r in _check_hook_lines(config)}
    promote = results["repmgr.conf promote_command"]
    assert promote.ok and promote.warning
    assert _status(list(results.values()))["repmgr.conf promote_command"] != "FAIL"


@pytest.mark.parametrize(("events", "expected"), [
    ("", "ok"),                                                   # no filter: every event
    ("standby_switchover", "FAIL"),                               # our events missing
])
def test_event_notifications(write_config: Callable[..., Path], repmgr_conf: Path,
                             events: str, expected: str) -> None:
    config = load_config(write_config())
    lines = [line for line in repmgr_conf_lines(config).splitlines()
             if not line.startswith("event_notifications")]
    if events:
        lines.append(f"event_notifications='{events}'")
    repmgr_conf.write_text(repmgr_conf.read_text() + "\n".join(lines) + "\n")
    assert _status(list(_check_hook_lines(config)))["repmgr.conf event_notifications"] == expected


def test_own_events_may_be_added(write_config: Callable[..., Path], repmgr_conf: Path) -> None:
    config = load_config(write_config())
    text = repmgr_conf_lines(config).replace("event_notifications='",
                                             "event_notifications='my_event,")
    repmgr_conf.write_text(repmgr_conf.read_text() + text)
    assert _status(list(_check_hook_lines(config)))["repmgr.conf event_notifications"] == "ok"


@pytest.mark.parametrize(("addresses", "expected"), [
    (("192.0.2.12/24",), "ok"),
    (("192.0.2.12/24", "192.0.2.115/24"), "ok"),
    (("192.0.2.12/16",), "WARN"),
    (("198.51.100.12/24",), "FAIL"),
    (("192.0.2.115/24",), "FAIL"),  # only the VIP itself
    ((), "FAIL"),
])
def test_vip_subnet(write_config: Callable[..., Path], addresses: tuple[str, ...],
                    expected: str) -> None:
    config = load_config(write_config())  # VIP 192.0.2.115/24
    result = _check_subnet(config, FakeNetwork(*addresses))  # type: ignore[arg-type]
    assert result.line().split()[0] == expected


@pytest.mark.parametrize(("vip", "addresses", "expected"), [
    ('"2001:db8::115/64"', ("192.0.2.12/24", "2001:db8::12/64", "fe80::1/64"), "ok"),
    ('"2001:db8::115/64"', ("192.0.2.12/24", "fe80::1/64"), "FAIL"),  # no IPv6 of its own
    ('"2001:db8::115/64"', ("2001:db8:1::12/64",), "FAIL"),
    ('["192.0.2.115/24", "2001:db8::115/64"]', ("192.0.2.12/24", "2001:db8::12/64"), "ok"),
    ('["192.0.2.115/24", "2001:db8::115/64"]', ("192.0.2.12/24",), "FAIL"),
    ('["192.0.2.115/24", "2001:db8::115/64"]', ("2001:db8::12/64",), "FAIL"),
    ('["192.0.2.115/24", "2001:db8::115/64"]', ("192.0.2.12/16", "2001:db8::12/64"), "WARN"),
])
def test_vip_subnet_per_family(write_config: Callable[..., Path], repmgr_conf: Path, vip: str,
                               addresses: tuple[str, ...], expected: str) -> None:
    """Each address of an IPv6 or dual-stack VIP needs the node's own subnet of its family."""
    config = load_config(write_config(f'repmgr_config = "{repmgr_conf}"\n[vip]\n'
                                      f'address = {vip}\ninterface = "lo"\n'))
    result = _check_subnet(config, FakeNetwork(*addresses))  # type: ignore[arg-type]
    assert result.line().split()[0] == expected


def test_check_output_round_trips() -> None:
    text = ("ok    config: /etc/repmgr-vip.toml (VIP ...)\n"
            "WARN  daemon on node3: not running: a blip\n"
            "FAIL  repmgr.conf promote_command: missing; add it\n"
            "1 check(s) failed\n")
    parsed = _parse_check_output(text)
    assert [r.line() for r in parsed] == text.splitlines()[:3]
