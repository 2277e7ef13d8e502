"""The daemon's LAN proof: three probes 20 ms apart, 80 ms in all, on its own raw socket.

A fake segment (a Unix datagram socket pair) stands in for the packet socket: a fake holder
reads every probe and answers after a delay, or drops some, as a real segment might. What
must hold: a present holder is always found, however its answers are delayed within the
window or lost (one probe or answer lost of three), and silence is the only way to "free".
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from repmgr_vip.adapters import arp, network
from repmgr_vip.config.schema import load_config

OWN = bytes.fromhex("020000000001")
HOLDER = bytes.fromhex("02000000beef")
VIP = "192.0.2.115"


class FakeHolder(threading.Thread):
    """The host holding the VIP: answers probes for it after `delay`, skipping `lose`."""

    def __init__(self, sock: socket.socket, delay: float, lose: set[int]) -> None:
        super().__init__(daemon=True)
        self.sock, self.delay, self.lose = sock, delay, lose
        self.probes: list[float] = []

    def run(self) -> None:
        while True:
            try:
                frame = self.sock.recv(2048)
            except OSError:
                return
            parsed = arp.parse_arp(frame)
            if parsed is None:
                continue
            self.probes.append(time.monotonic())
            op, _, sender_ip, target_ip = parsed
            if op != arp.REQUEST or sender_ip != b"\0" * 4 or len(self.probes) - 1 in self.lose:
                continue
            time.sleep(self.delay)
            answer = arp.arp_frame(arp.REPLY, HOLDER, target_ip, OWN, b"\0" * 4, dst_mac=OWN)
            try:
                self.sock.send(answer)
            except OSError:
                return


@contextmanager
def segment(monkeypatch: pytest.MonkeyPatch, *, holder: bool, delay: float = 0.001,
            lose: frozenset[int] = frozenset()) -> Iterator[FakeHolder | None]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    monkeypatch.setattr(arp, "interface_mac", lambda _iface: OWN)
    monkeypatch.setattr(arp, "_open", lambda _iface: ours)
    fake = FakeHolder(theirs, delay, set(lose)) if holder else None
    if fake is not None:
        fake.start()
    try:
        yield fake
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.01, 0.035])
def test_a_present_holder_is_found_whatever_its_answer_delay(
        monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    with segment(monkeypatch, holder=True, delay=delay):
        assert arp.lan_probe("eth0", VIP) == (arp.mac_text(HOLDER),)


@pytest.mark.parametrize("lose", [{0}, {1}, {0, 1}, {1, 2}])
def test_a_holder_whose_answers_get_lost_is_still_found(
        monkeypatch: pytest.MonkeyPatch, lose: set[int]) -> None:
    with segment(monkeypatch, holder=True, lose=frozenset(lose)):
        assert arp.lan_probe("eth0", VIP) == (arp.mac_text(HOLDER),)


def test_an_answer_to_the_last_probe_counts_while_the_window_lasts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the third probe is answered, 25 ms later: after the last send, before 80 ms."""
    with segment(monkeypatch, holder=True, delay=0.025, lose=frozenset({0, 1})) as fake:
        assert arp.lan_probe("eth0", VIP) == (arp.mac_text(HOLDER),)
    assert fake is not None and len(fake.probes) == arp.LAN_PROBES


def test_silence_sends_three_probes_spaced_out_and_proves_free(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    monkeypatch.setattr(arp, "interface_mac", lambda _iface: OWN)
    monkeypatch.setattr(arp, "_open", lambda _iface: ours)
    with ours, theirs:
        started = time.monotonic()
        assert arp.lan_probe("eth0", VIP) == ()
        took = time.monotonic() - started
        frames = []
        while True:
            try:
                frames.append(theirs.recv(2048, socket.MSG_DONTWAIT))
            except BlockingIOError:
                break
    assert len(frames) == arp.LAN_PROBES
    assert all(arp.parse_arp(f) == (arp.REQUEST, OWN, b"\0" * 4, bytes([192, 0, 2, 115]))
               for f in frames)
    assert took >= arp.LAN_WINDOW  # listened the whole window, not just until the last send


def test_the_schedule_follows_rfc_5227_probe_num_with_lan_intervals() -> None:
    assert arp.LAN_PROBES == 3  # RFC 5227 PROBE_NUM
    last_probe = (arp.LAN_PROBES - 1) * arp.LAN_SPACING
    assert arp.LAN_WINDOW - last_probe >= arp.LAN_SPACING  # the last probe is listened to
    assert arp.LAN_WINDOW <= 0.1  # a LAN proof: well under the 0.3 s arping listens


def _config(write_config: Callable[..., Path], tmp_path: Path,
            extra: str = "") -> network.Config:
    """conftest's config, in direct mode on eth0 (never probed: the probes are replaced)."""
    body = f'state_dir = "{tmp_path}"\n[privileges]\nmode = "direct"\n' + extra
    return load_config(write_config(address=f"{VIP}/24", interface="eth0", extra=body),
                       check_host=False)


def test_a_network_with_the_lan_proof_uses_it_and_one_without_keeps_the_configured_probe(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        write_config: Callable[..., Path]) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(arp, "probe", lambda *a: calls.append(a) or ())
    monkeypatch.setattr(network, "effective_mode", lambda _mode: "direct")
    config = _config(write_config, tmp_path)
    network.VipNetwork(config, lan_proof=True).probe()
    network.VipNetwork(config).probe()
    assert calls[0][:5] == ("eth0", VIP, arp.LAN_PROBES, arp.LAN_WINDOW, arp.LAN_SPACING)
    assert calls[1] == ("eth0", VIP, config.vip.probe_count, config.vip.probe_timeout)


def test_the_daemon_builds_its_network_with_the_lan_proof(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        write_config: Callable[..., Path]) -> None:
    from repmgr_vip.app import daemon

    made: list[bool] = []

    class Recorder(network.VipNetwork):
        def __init__(self, config: network.Config, announcer_file: Path | None = None, *,
                     lan_proof: bool = False) -> None:
            made.append(lan_proof)
            raise RuntimeError("enough")

    monkeypatch.setattr(daemon, "VipNetwork", Recorder)
    with pytest.raises(RuntimeError, match="enough"):
        daemon.Daemon(_config(write_config, tmp_path))
    # a DBA whose segment answers ARP slowly (stretched L2) keeps vip.probe_* in the daemon too
    with pytest.raises(RuntimeError, match="enough"):
        daemon.Daemon(_config(write_config, tmp_path,
                              "[daemon]\nlan_proof = false\nmetrics_port = 0\n"))
    assert made == [True, False]
