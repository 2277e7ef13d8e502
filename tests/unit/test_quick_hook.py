"""cli/quick.py: the promote hook's import-light start, against the real control server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from repmgr_vip.adapters import control
from repmgr_vip.cli import quick


def test_only_the_generated_hook_line_takes_the_quick_start() -> None:
    assert quick.quick_promote_socket(["-c", "/etc/x.toml", "promote", "--control", "/s"]) == "/s"
    for args in (["-c", "/etc/x.toml", "promote"], ["promote", "--control", "/s"],
                 ["-c", "/etc/x.toml", "release", "--control", "/s"]):
        assert quick.quick_promote_socket(args) is None


class Daemon:
    """A control server whose promote handler records the hook's messages."""

    def __init__(self, path: Path, verdict: dict[str, Any]) -> None:
        self.verdict = verdict
        self.seen: list[dict[str, Any]] = []
        self.server = control.ControlServer(path, self.handle, allowed_uids={os.geteuid(), 0},
                                            on_refused=lambda peer: None)
        self.server.bind()
        self.server.start()

    def handle(self, request: dict[str, Any], conv: control.Conversation,
               peer: control.Peer) -> None:
        self.seen.append(request)
        conv.send(self.verdict)
        while (message := conv.receive(5.0)) is not None:
            self.seen.append(message)
            if message.get("op") == "promoted":
                conv.send({"ok": True, "vip": True})
                return


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "control.sock"


def test_the_quick_hook_runs_the_verdicts_command_and_reports_it(socket_path: Path) -> None:
    daemon = Daemon(socket_path, {"ok": True, "want_vip": True, "unconfirmed": [],
                                  "argv": [sys.executable, "-c", "print('promoted'); exit(0)"],
                                  "env": {"REPMGR_VIP_INSIDE_HOOK": "1"}})
    try:
        assert quick.promote(str(socket_path)) == 0
    finally:
        daemon.server.close()
    ops = [m.get("op") for m in daemon.seen]
    assert ops == ["promote", "started", "promoted"]
    assert daemon.seen[0]["quick"] is True
    started, promoted = daemon.seen[1], daemon.seen[2]
    assert started["at"] >= started["asked"] >= (started["process_start"] or 0) - 1
    assert promoted["status"] == 0 and "promoted" in promoted["output"]


def test_repmgrs_status_is_the_hooks_and_a_refusal_runs_nothing(socket_path: Path) -> None:
    daemon = Daemon(socket_path, {"ok": True, "want_vip": True, "unconfirmed": [],
                                  "argv": [sys.executable, "-c", "exit(7)"]})
    try:
        assert quick.promote(str(socket_path)) == 7
        daemon.verdict = {"ok": True, "exit": 3}
        assert quick.promote(str(socket_path)) == 3
    finally:
        daemon.server.close()
    assert [m.get("op") for m in daemon.seen] == ["promote", "started", "promoted", "promote"]


@pytest.mark.parametrize("verdict", [{"ok": False, "error": "boom"},
                                     {"ok": True, "want_vip": True, "argv": "not a list"}])
def test_anything_unexpected_before_repmgr_starts_falls_back(socket_path: Path,
                                                            verdict: dict[str, Any]) -> None:
    daemon = Daemon(socket_path, verdict)
    try:
        with pytest.raises(quick.Fallback) as caught:
            quick.promote(str(socket_path))
    finally:
        daemon.server.close()
    assert not caught.value.ask_again  # the full CLI must not ask this daemon again


def test_no_daemon_falls_back_and_lets_the_full_cli_look_again(socket_path: Path) -> None:
    with pytest.raises(quick.Fallback) as caught:
        quick.promote(str(socket_path))
    assert caught.value.ask_again


@pytest.mark.parametrize("value", [
    {"ok": True, "want_vip": False, "unconfirmed": ["pg3", "n\u00f6de \"4\""], "exit": 3},
    {"argv": ["/usr/lib/postgresql/15/bin/repmgr", "-f", "/etc/repmgr.conf", "standby",
              "promote"], "env": {"REPMGR_VIP_INSIDE_HOOK": "1"}, "at": 1764201234.5678},
    {"output": "line 1\nline\t2 \u2603 \\ \x01", "status": 0, "process_start": None},
    [1, -2, 0.1, 1e300, [], {}],
])
def test_the_hooks_json_is_the_json_modules(value: Any) -> None:
    """The quick hook's encoder and decoder (built on _json, without json's imports) agree
    with the json module both ways."""
    assert json.loads(quick.dumps(value)) == value
    assert quick.loads(json.dumps(value).encode()) == value
    assert quick.loads(b"  " + json.dumps(value).encode() + b" \r") == value


@pytest.mark.parametrize("line", [b"", b"{", b'{"a": 1} x', b"NaN", b'{"a": Infinity}',
                                  b"\xff\xfe", b'{"a": 1,}', b"[" * 100000])
def test_a_line_that_is_not_json_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        quick.loads(line)


def test_the_quick_hook_imports_nothing_it_can_do_without() -> None:
    """What an import costs is client outage on this path: json, re, socket, enum, typing,
    selectors, subprocess and pathlib stay out (started with -S, as the Debian package's entry)."""
    src = Path(quick.__file__).parents[2]
    heavy = ("json", "re", "socket", "enum", "typing", "selectors", "subprocess",
             "pathlib")
    code = (f"import sys; sys.path.insert(0, {str(src)!r}); import repmgr_vip.cli.quick; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == ""
