"""The metrics endpoint: idle connections cost no thread and never delay a scrape."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from repmgr_vip.app import metrics
from repmgr_vip.app.metrics import Metrics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def endpoint() -> Iterator[Metrics]:
    m = Metrics("127.0.0.1", _free_port())
    m.start()
    yield m
    if hasattr(m, "stop"):
        m.stop()


def _scrape(port: int, timeout: float) -> tuple[float, str]:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as answer:
        body = answer.read().decode()
    return time.monotonic() - started, body


def test_idle_connections_cost_no_thread_and_do_not_delay_a_scrape(endpoint: Metrics) -> None:
    _scrape(endpoint.port, 5)
    before = set(threading.enumerate())  # other tests' threads may end meanwhile: not counted

    def new_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before]

    idle = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(20)]
    slow = socket.create_connection(("127.0.0.1", endpoint.port))
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # head never finished
    try:
        time.sleep(0.5)
        assert not new_threads()
        took, body = _scrape(endpoint.port, metrics.CONNECTION_TIMEOUT)
        assert "repmgr_vip_held" in body
        assert took < 1.0, took
        assert not new_threads()
        # the idle ones are dropped after the connection timeout, not kept forever
        idle[0].settimeout(metrics.CONNECTION_TIMEOUT + 3)
        assert idle[0].recv(1) == b""
    finally:
        for sock in [*idle, slow]:
            sock.close()


def test_an_idle_endpoint_sleeps_until_a_client_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No polling tick: an unscraped endpoint costs the daemon no wake-up (its CPU in a
    quiet cluster), yet answers a scrape and stops at once."""
    calls: list[float | None] = []
    base = metrics.selectors.DefaultSelector

    class Counting(base):  # type: ignore[valid-type, misc]
        def select(self, timeout: float | None = None) -> Any:
            calls.append(timeout)
            return super().select(timeout)

    monkeypatch.setattr(metrics.selectors, "DefaultSelector", Counting)
    m = Metrics("127.0.0.1", _free_port())
    m.start()
    try:
        time.sleep(1.2)
        assert len(calls) == 1, calls  # one wait, still pending
        _, body = _scrape(m.port, 5)
        assert "repmgr_vip_held" in body
    finally:
        started = time.monotonic()
        m.stop()
        assert time.monotonic() - started < 0.3
