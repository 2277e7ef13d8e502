"""Sudo mode's announcement: a promotion waits until `sudo arping -U` has sent its first
packet (a few milliseconds), not a fixed 0.1 s, and still hears a quick failure."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from repmgr_vip.adapters import network


def _program(tmp_path: Path, body: str) -> str:
    path = tmp_path / "arping"  # the name _sent_first looks for among the children
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_an_announcer_waiting_after_its_first_packet_is_let_run_at_once(tmp_path: Path) -> None:
    arping = _program(tmp_path, "sleep 30\n")
    for argv in ([arping], ["/bin/sh", "-c", f"{arping}; :"]):  # itself, or under a parent
        proc = _start(argv)
        try:
            began = time.monotonic()
            assert network._sent_first(proc, arping, 5.0)
            assert time.monotonic() - began < 2.0  # not the bound: it saw arping waiting
        finally:
            proc.kill()
            proc.wait()


def test_a_quick_failure_is_still_the_callers_to_report(tmp_path: Path) -> None:
    arping = _program(tmp_path, "echo 'arping: unknown iface eth9' >&2; exit 2\n")
    proc = _start([arping])
    assert not network._sent_first(proc, arping, 5.0)
    assert proc.returncode == 2


def test_a_program_that_never_starts_arping_is_given_the_bound_only(tmp_path: Path) -> None:
    proc = _start(["/bin/sh", "-c", "while :; do :; done"])  # busy, never arping
    try:
        began = time.monotonic()
        assert network._sent_first(proc, _program(tmp_path, ""), 0.2)
        assert 0.2 <= time.monotonic() - began < 2.0
    finally:
        proc.kill()
        proc.wait()
