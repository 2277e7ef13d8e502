"""`status` with hostile or broken peers: no crash, and nothing raw reaches the terminal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from repmgr_vip.adapters import cluster
from repmgr_vip.adapters.remote import RemoteResult
from repmgr_vip.app import status
from repmgr_vip.cli.main import main
from repmgr_vip.core.model import NodeRecord, NodeView

EVIL = "db\x1b]0;owned\x07\x1b[2J\u202e3"


def _cluster(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str],
             names: dict[int, str] | None = None) -> None:
    names = names or {}
    nodes = [NodeRecord(i, names.get(i, f"pg-{i}"), "standby" if i != 1 else "primary", True,
                        f"host=192.0.2.{10 + i} port=5432", 0) for i in (1, 3, 4)]

    def view(node_id: int, conninfo: str, timeout: float) -> NodeView:
        return NodeView(node_id, reachable=True, in_recovery=node_id != 1, timeline=1)

    def remote(config: Any, host: str, argv: list[str], *, timeout: float | None = None
               ) -> RemoteResult:
        return RemoteResult(host, 0, answers[host], "")

    monkeypatch.setattr(cluster, "registered_nodes", lambda config: nodes)
    monkeypatch.setattr(cluster, "query_view", view)
    monkeypatch.setattr(status, "run_remote", remote)


@pytest.mark.parametrize("answer", ["[]", '"x"', "3", "null", '[{"holds_vip": true}]'])
def test_a_peer_answering_json_that_is_not_an_object_gets_a_note(
        answer: str, write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    good = '{"node_id": 1, "holds_vip": true, "daemon_pid": null, "last_decision": "ok"}'
    _cluster(monkeypatch, {"192.0.2.11": good, "192.0.2.13": answer, "192.0.2.14": good})
    code = main(["-c", str(write_config()), "status"])
    out = capsys.readouterr()
    assert "Traceback" not in out.err and code in (0, 1), out.err
    row = next(line for line in out.out.splitlines() if line.startswith("3 "))
    assert "unexpected answer" in row and " ? " in row  # the VIP column: unknown


def test_terminal_escapes_from_peers_are_shown_escaped(
        write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    note = '{"holds_vip": true, "daemon_pid": 1, "last_decision": "x\\u001b[31mred\\r"}'
    _cluster(monkeypatch, {"192.0.2.11": note, "192.0.2.13": note, "192.0.2.14": note},
             names={3: EVIL})
    assert main(["-c", str(write_config()), "status"]) == 1  # three holders: a conflict
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\x07\r\u202e"), repr(out)
    assert "\\x1b[2J" in out and "\\u202e" in out
    assert main(["-c", str(write_config()), "status", "--json"]) == 1
    assert "\x1b" not in capsys.readouterr().out


def test_printable_keeps_ordinary_text() -> None:
    assert status.printable("pg-b ünïcode 1") == "pg-b ünïcode 1"
    assert status.printable("a\nb\\") == "a\\nb\\\\"
