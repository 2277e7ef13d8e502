"""The raw ARP socket hears only its own interface: bound before it receives anything."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from repmgr_vip.adapters import arp


class FakeSocket:
    calls: list[tuple[str, Any]]

    def __init__(self, family: int, kind: int, proto: int = 0) -> None:
        FakeSocket.calls.append(("socket", (family, kind, proto)))

    def bind(self, address: tuple[str, int]) -> None:
        FakeSocket.calls.append(("bind", address))

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        FakeSocket.calls.append(("close", None))


def test_socket_is_created_deaf_and_bound_to_the_interface(
        monkeypatch: pytest.MonkeyPatch) -> None:
    FakeSocket.calls = []
    monkeypatch.setattr(arp.socket, "socket", FakeSocket)
    monkeypatch.setattr(arp.select, "select", lambda r, w, x, t: ([], [], []))
    arp._open("eth7")
    assert FakeSocket.calls[0] == ("socket", (socket.AF_PACKET, socket.SOCK_RAW, 0))
    assert FakeSocket.calls[1] == ("bind", ("eth7", arp.ETH_P_ARP))


@pytest.mark.skipif(os.geteuid() != 0, reason="packet sockets need CAP_NET_RAW")
def test_real_socket_is_bound_to_arp_on_the_interface() -> None:
    with arp._open("lo") as sock:  # opened only: nothing is sent
        name, proto = sock.getsockname()[:2]
        assert (name, proto) == ("lo", arp.ETH_P_ARP)


def test_frame_building_and_parsing_round_trip() -> None:
    mac = bytes.fromhex("020000000001")
    frame = arp.arp_frame(arp.REPLY, mac, bytes([192, 0, 2, 115]), mac, bytes([192, 0, 2, 1]))
    assert len(frame) == 60
    assert arp.parse_arp(frame) == (arp.REPLY, mac, bytes([192, 0, 2, 115]),
                                    bytes([192, 0, 2, 1]))
    assert arp.parse_arp(frame[:20]) is None
