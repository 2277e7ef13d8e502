"""The daemon's in-process `ssh -O check` (OpenSSH's mux protocol), against a scripted master."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from repmgr_vip.adapters import sshmux


def _packet(*words: int) -> bytes:
    body = b"".join(struct.pack(">I", w) for w in words)
    return struct.pack(">I", len(body)) + body


def _serve(path: Path, answer: Callable[[socket.socket], None]) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        with conn, server:
            answer(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _master(conn: socket.socket) -> None:
    """As ssh's master: hello first, then MUX_S_ALIVE for the client's request id."""
    conn.sendall(_packet(sshmux.MUX_MSG_HELLO, 4))
    hello = conn.recv(12)
    assert struct.unpack(">III", hello) == (8, sshmux.MUX_MSG_HELLO, 4)
    _, kind, request = struct.unpack(">III", conn.recv(12))
    assert kind == sshmux.MUX_C_ALIVE_CHECK
    conn.sendall(_packet(sshmux.MUX_S_ALIVE, request, 4242))


def test_a_live_master_answers(tmp_path: Path) -> None:
    path = tmp_path / "master"
    thread = _serve(path, _master)
    assert sshmux.mux_alive(str(path))
    thread.join(5)


@pytest.mark.parametrize("answer", [
    lambda conn: None,  # accepts and hangs up
    lambda conn: conn.sendall(_packet(0x7, 4)),  # not a hello
    lambda conn: (conn.sendall(_packet(sshmux.MUX_MSG_HELLO, 4)), conn.recv(24),
                  conn.sendall(_packet(sshmux.MUX_S_ALIVE, 99, 1))),  # another request's
    lambda conn: conn.sendall(struct.pack(">I", 1 << 30)),  # absurd length
], ids=["hangs-up", "no-hello", "wrong-request", "bad-length"])
def test_anything_else_is_not_alive(tmp_path: Path, answer: Callable[[socket.socket], None]
                                    ) -> None:
    path = tmp_path / "master"
    thread = _serve(path, answer)
    assert not sshmux.mux_alive(str(path), timeout=2.0)
    thread.join(5)


def test_no_socket_is_not_alive(tmp_path: Path) -> None:
    assert not sshmux.mux_alive(str(tmp_path / "missing"))
