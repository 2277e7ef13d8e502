"""SIGHUP reload: a valid file takes effect in the running daemon; an invalid one is refused."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from repmgr_vip.app.daemon import Daemon
from repmgr_vip.app.reload import reload_config, reload_daemon
from repmgr_vip.config.schema import load_config

NO_METRICS = "[daemon]\nmetrics_port = 0\n"


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(autouse=True)
def propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let caplog see repmgr_vip's records (setup_logging turns propagation off)."""
    monkeypatch.setattr(logging.getLogger("repmgr_vip"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("repmgr_vip"), "handlers", [])


def test_valid_change_is_applied_to_the_running_daemon(
        write_config: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(extra="")
    path.write_text(path.read_text() + NO_METRICS)
    daemon = Daemon(load_config(path))
    assert daemon.config.daemon.reannounce_interval == 0.0
    path.write_text(path.read_text().replace(
        NO_METRICS, NO_METRICS + "reannounce_interval = 5.0\nisolation_grace = 0.5\n"
        "interval = 0.5\n"))
    with caplog.at_level(logging.INFO, logger="repmgr_vip"):
        assert reload_daemon(daemon)
    assert daemon.config.daemon.reannounce_interval == 5.0
    assert daemon.network.config is daemon.config
    assert daemon.policy.isolation_grace == 0.5
    assert not _errors(caplog)
    assert not reload_daemon(daemon)  # nothing changed the second time


@pytest.mark.parametrize("body", [
    "this is not TOML [",
    "[daemon]\ninterval = -1\n",
    "[daemon]\nno_such_key = 1\n",
    "[vip]\naddress = '192.0.2.200/24'\ninterface = 'lo'\n",   # restart-only key
    "[daemon]\nmetrics_port = 9999\n",                        # restart-only key
    "[replica_vip]\naddress = '192.0.2.116/24'\n",             # its thread keeps its own
])
def test_invalid_or_restart_only_change_is_refused_in_one_line(
        write_config: Callable[..., Path], caplog: pytest.LogCaptureFixture, body: str) -> None:
    path = write_config()
    current = load_config(path)
    text = path.read_text()
    if body.startswith("[vip]"):
        text = text.split("[vip]")[0] + body
    else:
        text += body
    path.write_text(text)
    with caplog.at_level(logging.INFO, logger="repmgr_vip"):
        assert reload_config(current) is current
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0], errors


def test_missing_file_is_refused(write_config: Callable[..., Path],
                                 caplog: pytest.LogCaptureFixture) -> None:
    path = write_config()
    current = load_config(path)
    path.unlink()
    with caplog.at_level(logging.INFO, logger="repmgr_vip"):
        assert reload_config(current) is current
    assert len(_errors(caplog)) == 1


def test_refusal_is_one_structured_json_line(write_config: Callable[..., Path],
                                             tmp_path: Path) -> None:
    import json

    from repmgr_vip.adapters.log import setup_logging

    path = write_config()
    current = load_config(path)
    path.write_text(path.read_text() + "[daemon]\ninterval = -1\n")
    stderr = tmp_path / "stderr"
    with stderr.open("w", encoding="utf-8") as stream:
        setup_logging(None, "pg-b", log_format="json", stream=stream)
        assert reload_config(current) is current
    lines = stderr.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (record["level"], record["event"], record["outcome"]) == ("error", "reload", "refused")
    assert "daemon.interval" in record["message"]


def test_reload_refreshes_every_address_of_a_dual_stack_vip(
        write_config: Callable[..., Path], repmgr_conf: Path) -> None:
    """Probe and announce run each address's own lines: a reload must reach all of them."""
    from repmgr_vip.adapters.network import VipNetwork

    path = write_config(f'repmgr_config = "{repmgr_conf}"\n[vip]\n'
                        'address = ["192.0.2.115/24", "2001:db8::115/64"]\ninterface = "lo"\n'
                        + NO_METRICS)
    daemon = Daemon(load_config(path))
    path.write_text(path.read_text().replace('interface = "lo"\n',
                                             'interface = "lo"\nprobe_timeout = 0.9\n'))
    assert reload_daemon(daemon)
    assert isinstance(daemon.network, VipNetwork)
    assert [m.probe_timeout for m in daemon.network.members] == [0.9, 0.9]
