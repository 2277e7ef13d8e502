"""Shipped files and generated hook lines: what a DBA copies must be right."""

from __future__ import annotations

import configparser
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from repmgr_vip.app.fencing import fence_command_argv
from repmgr_vip.cli.main import main
from repmgr_vip.config.repmgrconf import parse_repmgr_conf_text
from repmgr_vip.core.model import NodeRecord

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(CONTRIB / name)
    return parser


def test_daemon_unit_runs_as_postgres_with_only_network_capabilities() -> None:
    service = _unit("repmgr-vip.service")["Service"]
    assert service["Type"] == "notify"
    assert service["User"] == "postgres"
    assert set(service["AmbientCapabilities"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"].split()[-1] == "daemon"


def test_daemon_unit_has_a_watchdog_and_both_state_layouts() -> None:
    service = _unit("repmgr-vip.service")["Service"]
    assert 0 < int(service["WatchdogSec"]) <= 60
    paths = service["ReadWritePaths"].split()
    assert {"-/var/lib/postgresql", "-/var/lib/pgsql"} <= set(paths)  # Debian and RHEL


def test_repmgrd_unit_stays_in_the_foreground() -> None:
    service = _unit("repmgrd.service")["Service"]
    assert "--daemonize=false" in service["ExecStart"]
    assert service["User"] == "postgres"


def test_repmgr_conf_lines_parse_and_quote(write_config: Callable[..., Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(write_config()), "repmgr-conf"]) == 0
    values = parse_repmgr_conf_text(capsys.readouterr().out)
    for key, subcommand in [("promote_command", "promote"), ("follow_command", "follow"),
                            ("repmgrd_service_start_command", "start-repmgrd"),
                            ("repmgrd_service_stop_command", "stop-repmgrd"),
                            ("child_nodes_disconnect_command", "fence-self"),
                            ("event_notification_command", "event")]:
        words = shlex.split(values[key])  # repmgr hands these to a shell
        assert Path(words[0]).is_absolute(), words
        assert words[1] == "-c" and Path(words[2]).is_absolute()
        assert words[3] == subcommand
    assert shlex.split(values["follow_command"])[-1] == "%n"
    assert "--event=%e" in values["event_notification_command"]
    assert "standby_switchover" in values["event_notifications"].split(",")


def test_fence_command_placeholders_never_reach_a_shell() -> None:
    node = NodeRecord(1, "db1; rm -rf /", "primary", True, "host='10.0.0.1 x'", 0)
    argv = fence_command_argv("/usr/local/bin/ipmi-off --host {host} --name {node_name}", node)
    assert argv == ["/usr/local/bin/ipmi-off", "--host", "10.0.0.1 x", "--name", "db1; rm -rf /"]


def test_check_warns_when_isolation_grace_is_not_shorter_than_repmgr_detection(
        write_config: Callable[..., Path]) -> None:
    from repmgr_vip.app.doctor import _check_isolation_grace
    from repmgr_vip.config.schema import load_config

    # the fixture's repmgr.conf: reconnect_attempts=3, reconnect_interval=2 -> 6 s
    auto = _check_isolation_grace(load_config(write_config()))
    assert auto.ok and not auto.warning and auto.detail.startswith("3 s")
    slow = _check_isolation_grace(load_config(_with_daemon(write_config(),
                                                           "isolation_grace = 6")))
    assert slow.warning and "make it shorter" in slow.detail


def _with_daemon(path: Path, line: str) -> Path:
    path.write_text(path.read_text() + f"\n[daemon]\n{line}\n")
    return path
