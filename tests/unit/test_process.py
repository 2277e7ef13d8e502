"""Children: no ambient capabilities unless privileged, one runner, ssh that gives up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from repmgr_vip.adapters.remote import ssh_argv, start_remote
from repmgr_vip.config.schema import load_config

NET_CAPS = (1 << 12) | (1 << 13)  # CAP_NET_ADMIN, CAP_NET_RAW

CHILD_CAPS = """
import json, re
from repmgr_vip.adapters import process

def caps(text):
    return {k: int(v, 16) for k, v in re.findall(r"^(Cap(?:Amb|Eff|Inh)):\\s*(\\w+)", text, re.M)}

argv = ["/bin/cat", "/proc/self/status"]
started = process.start(argv)
started.wait(10)
print(json.dumps({
    "plain": caps(process.run(argv, timeout=10).stdout),
    "privileged": caps(process.run(argv, timeout=10, privileged=True).stdout),
    "started": caps(started.output_text()),
    "popen": caps(process.popen_text(argv, privileged=False, stdout=-1,
                                     stderr=None).communicate()[0]),
}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process with ambient caps")
def test_children_start_without_ambient_capabilities_unless_privileged() -> None:
    # the daemon as the systemd unit runs it: postgres with ambient CAP_NET_ADMIN/NET_RAW
    result = subprocess.run(
        ["/usr/bin/setpriv", "--inh-caps=+net_admin,+net_raw",
         "--ambient-caps=+net_admin,+net_raw", "--reuid=postgres", "--regid=postgres",
         "--init-groups", sys.executable, "-c", CHILD_CAPS],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    for kind in ("plain", "started", "popen"):
        assert seen[kind]["CapAmb"] == 0, (kind, seen)
        assert seen[kind]["CapEff"] == 0, (kind, seen)
        assert seen[kind]["CapInh"] == 0, (kind, seen)
    assert seen["privileged"]["CapAmb"] & NET_CAPS == NET_CAPS, seen
    assert seen["privileged"]["CapEff"] & NET_CAPS == NET_CAPS, seen


def test_ssh_sessions_to_a_dead_peer_end(write_config: Callable[..., Path]) -> None:
    argv = ssh_argv(load_config(write_config()), "192.0.2.1", ["true"])
    options = [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]
    assert "ServerAliveInterval=1" in options and "ServerAliveCountMax=3" in options
    assert argv.index("--") > argv.index("ServerAliveCountMax=3")


def test_missing_ssh_is_a_failed_session_not_a_crash(write_config: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    body = write_config().read_text() + f'\n[commands]\nssh = "{tmp_path}/no-such-ssh"\n'
    config = load_config(write_config(body))
    session = start_remote(config, "192.0.2.1", ["true"])
    assert session.finished()
    result = session.result()
    assert not result.ok and "no-such-ssh" in result.stderr


def test_a_release_over_ssh_names_the_mac_it_released_from_and_nothing_else_does() -> None:
    """`release` over ssh prints the MAC line (model.RELEASED_FROM_MAC) only when it removed
    the VIP; the promoting node counts it only from a release that succeeded."""
    import sys

    from repmgr_vip.adapters.process import start
    from repmgr_vip.adapters.remote import RemoteSession

    def said(code: int, *lines: str) -> tuple[str, ...]:
        script = "".join(f"print({line!r})\n" for line in lines) + f"raise SystemExit({code})"
        return RemoteSession("pg1", start([sys.executable, "-c", script])).result().macs

    assert said(0, "released-from-mac 02:aa:00:00:00:01", "removed 192.0.2.115/24 from eth0"
                ) == ("02:aa:00:00:00:01",)
    assert said(0, "192.0.2.115/24 not on eth0; nothing to do") == ()
    assert said(1, "released-from-mac 02:aa:00:00:00:01") == ()  # failed: it counts for nothing
    assert said(0, "released-from-mac 02:AA:00:00:00:01 and more") == ()  # not the exact line
