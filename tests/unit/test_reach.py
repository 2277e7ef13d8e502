"""How our ssh connects: the key exchange it offers first, where it would connect (the
release retrier's reach probe), and noticing that a node answers there again (only loopback
sockets of this test are contacted; `ssh -G` connects nowhere)."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from repmgr_vip.adapters.reach import (
    REST_AFTER_ANSWER,
    Endpoint,
    ReachProbe,
    parse_ssh_g,
    ssh_endpoint,
)
from repmgr_vip.adapters.remote import ssh_options
from repmgr_vip.config.schema import Config, load_config


def test_ssh_g_output_gives_host_and_port_unless_a_proxy_is_in_the_way() -> None:
    plain = "user postgres\nhostname 192.0.2.11\nport 2222\nproxyusefdpass no\n"
    assert parse_ssh_g(plain) == ("192.0.2.11", 2222)
    assert parse_ssh_g(plain + "proxycommand nc %h %p\n") is None
    assert parse_ssh_g(plain + "proxyjump bastion\n") is None
    assert parse_ssh_g("hostname db1\n") is None  # no port: nothing to probe


def test_the_endpoint_is_what_ssh_itself_resolves(write_config: Callable[..., Path]) -> None:
    """`ssh -G` (no connection) with repmgr.conf's ssh_options: -p reaches the probe."""
    config = load_config(write_config())
    config = dataclasses.replace(
        config, repmgr=dataclasses.replace(config.repmgr, ssh_options="-p 2222"))
    assert ssh_endpoint(config, "127.0.0.1") == Endpoint(socket.AF_INET, ("127.0.0.1", 2222))
    proxied = dataclasses.replace(config, repmgr=dataclasses.replace(
        config.repmgr, ssh_options="-o ProxyJump=bastion"))
    assert ssh_endpoint(proxied, "127.0.0.1") is None


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


def _poll(probe: ReachProbe, start: float, within: float) -> float | None:
    """The probe's time of answer (its own clock, from start), or None if silent."""
    now = start
    while now < start + within:
        if probe.answered(now):
            return now - start
        time.sleep(0.01)
        now += 0.01
    return None


def test_a_listening_node_is_noticed_then_the_probe_rests(listener: socket.socket) -> None:
    endpoint = Endpoint(socket.AF_INET, listener.getsockname())
    probe = ReachProbe(lambda: endpoint)
    try:
        answered = _poll(probe, 100.0, 1.0)
        assert answered is not None and answered < 0.5
        # at most one early attempt per REST_AFTER_ANSWER: silent until then, then again
        assert _poll(probe, 100.0 + answered, REST_AFTER_ANSWER - 0.05) is None
        assert _poll(probe, 100.0 + answered + REST_AFTER_ANSWER, 1.0) is not None
    finally:
        probe.close()
    assert not probe.answered(1000.0)


def test_a_refusing_or_unknown_endpoint_never_answers() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: every SYN is refused
    try:
        refused = ReachProbe(lambda: Endpoint(socket.AF_INET, closed.getsockname()))
        unknown = ReachProbe(lambda: None)  # a proxy, or the name did not resolve
        assert _poll(refused, 0.0, 0.6) is None
        assert _poll(unknown, 0.0, 0.3) is None
    finally:
        closed.close()


def _kex(config: Config) -> list[str]:
    """The key exchange order ssh would offer with our options (`ssh -G`: no connection)."""
    out = subprocess.run([config.commands.ssh, *ssh_options(config), "-G", "--", "127.0.0.1"],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    line = next(v for v in out.splitlines() if v.startswith("kexalgorithms "))
    return line.split(" ", 1)[1].split(",")


def test_a_fast_key_exchange_goes_first_unless_the_dba_chose(
        write_config: Callable[..., Path]) -> None:
    """The hybrid post-quantum default costs each fresh connection ~100 ms here; our ssh
    offers curve25519-sha256 first, keeps the rest of ssh's list, and yields to a
    KexAlgorithms in repmgr.conf's ssh_options or to ssh_kex_first = ""."""
    config = load_config(write_config())
    default = _kex(dataclasses.replace(config, fencing=dataclasses.replace(
        config.fencing, ssh_kex_first="")))
    ours = _kex(config)
    assert ours[0] == "curve25519-sha256" and default[0] != "curve25519-sha256"
    assert sorted(ours) == sorted(default)  # reordered, nothing added or dropped
    chosen = dataclasses.replace(config, repmgr=dataclasses.replace(
        config.repmgr, ssh_options="-o KexAlgorithms=diffie-hellman-group14-sha256"))
    assert _kex(chosen) == ["diffie-hellman-group14-sha256"]
