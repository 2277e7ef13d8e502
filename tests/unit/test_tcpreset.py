"""The reset a released node sends for SYNs that clients still address to its MAC.

The frame builder on crafted frames, IPv4 and IPv6 (checked with a checksum written here, not
the module's), then the real thing as root, both families: two private network namespaces
joined by a veth pair (no packet leaves them), a client whose neighbour entry for the VIP
still names the old holder's MAC.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from repmgr_vip.adapters import tcpreset
from repmgr_vip.testing import bpf_passes
from tests.unit.conftest import IP, link_mac, veth_namespaces

OWN = bytes.fromhex("02aa00000001")
CLIENT_MAC = bytes.fromhex("02bb00000002")
VIP = bytes([192, 0, 2, 100])
CLIENT = bytes([192, 0, 2, 50])


def _sum16(data: bytes) -> int:
    """Ones' complement sum, folded: 0xFFFF over a header whose checksum is right."""
    data = data + b"\x00" * (len(data) % 2)
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _frame(flags: int = 0x02, *, dst_mac: bytes = OWN, dst: bytes = VIP, proto: int = 6,
           fragment: int = 0, seq: int = 0xFFFFFFFF, payload: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5432, seq, 0, 5 << 4, flags, 64240, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, fragment, 64, proto, 0,
                     CLIENT, dst)
    return dst_mac + CLIENT_MAC + b"\x08\x00" + ip + tcp


def test_a_syn_to_the_vip_gets_the_reset_a_closed_port_gets() -> None:
    answer = tcpreset.reset_for(_frame(), OWN, VIP)
    assert answer is not None and len(answer) >= 60
    assert answer[0:6] == CLIENT_MAC and answer[6:12] == OWN and answer[12:14] == b"\x08\x00"
    ip = answer[14:34]
    assert ip[0] == 0x45 and ip[9] == 6 and ip[12:16] == VIP and ip[16:20] == CLIENT
    assert _sum16(ip) == 0xFFFF
    length = struct.unpack("!H", ip[2:4])[0]
    tcp = answer[34:14 + length]
    sport, dport, seq, ack = struct.unpack("!HHII", tcp[0:12])
    assert (sport, dport, seq) == (5432, 40000, 0)
    assert ack == 0  # the SYN's sequence number 0xFFFFFFFF, plus one, wraps
    assert tcp[13] == 0x14  # RST|ACK
    pseudo = VIP + CLIENT + struct.pack("!BBH", 0, 6, len(tcp))
    assert _sum16(pseudo + tcp) == 0xFFFF


NOT_ANSWERED = {
    "ack": _frame(0x10), "syn-ack": _frame(0x12), "rst": _frame(0x04),
    "syn-rst": _frame(0x02 | 0x04), "other-mac": _frame(dst_mac=CLIENT_MAC),
    "other-ip": _frame(dst=CLIENT), "udp": _frame(proto=17),
    "more-fragments": _frame(fragment=0x2000), "offset": _frame(fragment=0x0010),
    "short": _frame()[:40], "empty": b"",
}


@pytest.mark.parametrize("frame", NOT_ANSWERED.values(), ids=NOT_ANSWERED.keys())
def test_nothing_but_a_syn_to_the_vip_at_our_mac_is_answered(frame: bytes) -> None:
    assert tcpreset.reset_for(frame, OWN, VIP) is None


VIP6 = bytes.fromhex("20010db8000000000000000000000100")
CLIENT6 = bytes.fromhex("20010db8000000000000000000000050")


def _frame6(flags: int = 0x02, *, dst: bytes = VIP6, next_header: int = 6,
            ethertype: bytes = b"\x86\xdd", seq: int = 7, payload: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5432, seq, 0, 5 << 4, flags, 64240, 0, 0) + payload
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), next_header, 64, CLIENT6, dst)
    return OWN + CLIENT_MAC + ethertype + ip + tcp


def test_an_ipv6_syn_to_the_vip_gets_the_reset_too() -> None:
    answer = tcpreset.reset_for(_frame6(payload=b"xy"), OWN, VIP6)
    assert answer is not None
    assert answer[0:6] == CLIENT_MAC and answer[6:12] == OWN and answer[12:14] == b"\x86\xdd"
    ip = answer[14:54]
    assert ip[0] >> 4 == 6 and ip[6] == 6 and ip[8:24] == VIP6 and ip[24:40] == CLIENT6
    tcp = answer[54:54 + struct.unpack("!H", ip[4:6])[0]]
    sport, dport, seq, ack = struct.unpack("!HHII", tcp[0:12])
    assert (sport, dport, seq, ack) == (5432, 40000, 0, 7 + 1 + 2)
    assert tcp[13] == 0x14  # RST|ACK
    pseudo = VIP6 + CLIENT6 + struct.pack("!I", len(tcp)) + b"\x00\x00\x00\x06"
    assert _sum16(pseudo + tcp) == 0xFFFF


NOT_ANSWERED6 = {
    "syn-ack": _frame6(0x12), "other-ip": _frame6(dst=CLIENT6),
    "extension-header": _frame6(next_header=0),  # hop-by-hop
    "ipv4-type": _frame6(ethertype=b"\x08\x00"), "short": _frame6()[:60], "ipv4-frame": _frame(),
}


@pytest.mark.parametrize("frame", NOT_ANSWERED6.values(), ids=NOT_ANSWERED6.keys())
def test_nothing_but_an_ipv6_syn_to_the_vip_is_answered(frame: bytes) -> None:
    assert tcpreset.reset_for(frame, OWN, VIP6) is None


def test_data_on_the_syn_is_acknowledged_too() -> None:
    answer = tcpreset.reset_for(_frame(seq=1000, payload=b"abcd"), OWN, VIP)
    assert answer is not None
    assert struct.unpack("!I", answer[14 + 20 + 8:14 + 20 + 12])[0] == 1005


def _with_options(frame: bytes) -> bytes:
    """The IPv4 frame with 4 bytes of IP options (NOPs): the TCP header moves 4 bytes on."""
    ip = bytearray(frame[14:34])
    ip[0] = 0x46
    ip[2:4] = struct.pack("!H", struct.unpack("!H", ip[2:4])[0] + 4)
    return frame[:14] + bytes(ip) + b"\x01\x01\x01\x01" + frame[34:]


ANSWERED = {"syn": _frame(), "syn-with-data": _frame(payload=b"xy"),
            "syn-with-ip-options": _with_options(_frame())}
ANSWERED6 = {"syn": _frame6(), "syn-with-data": _frame6(payload=b"xy")}


@pytest.mark.parametrize(("vip", "frames"), [
    (VIP, {**ANSWERED, **NOT_ANSWERED, "ip-options-ack": _with_options(_frame(0x10))}),
    (VIP6, {**ANSWERED6, **NOT_ANSWERED6})], ids=["ipv4", "ipv6"])
def test_the_kernel_filter_passes_exactly_the_frames_that_get_a_reset(
        vip: bytes, frames: dict[str, bytes]) -> None:
    """What the BPF filter lets up to Python is what reset_for answers: nothing it answers
    is dropped, nothing it ignores is passed (so on a busy LAN Python sees only SYNs)."""
    program = tcpreset.syn_filter(OWN, vip)
    passed = {name for name, frame in frames.items() if bpf_passes(program, frame)}
    answered = {name for name, frame in frames.items()
                if tcpreset.reset_for(frame, OWN, vip) is not None}
    assert answered == set(ANSWERED if len(vip) == 4 else ANSWERED6)
    assert passed == answered


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """A client namespace and an old holder's, a veth pair between them."""
    with veth_namespaces("rst", ("c0", "h0"), (("192.0.2.50/24", "2001:db8::50/64"),
                                               ("192.0.2.1/24", "2001:db8::1/64"))) as names:
        yield names


def _pinned_client(client: str, holder: str, vip: str) -> Callable[[float], str]:
    """The client's neighbour entry for the VIP pinned to the old holder's MAC (the VIP is on
    neither namespace); a function that connects to the VIP's port once and says how it
    ended."""
    subprocess.run([IP, "-n", client, "neigh", "replace", vip, "lladdr", link_mac(holder, "h0"),
                    "dev", "c0", "nud", "permanent"], check=True, timeout=10)

    def connect(timeout: float) -> str:
        return subprocess.run([IP, "netns", "exec", client, sys.executable, "-c", _CONNECT,
                               str(timeout), vip], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    return connect


_CONNECT = """
import socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET
s = socket.socket(family); s.settimeout(float(sys.argv[1])); t = time.monotonic()
try:
    s.connect((sys.argv[2], 5432)); print("connected")
except ConnectionRefusedError:
    print("refused", round(time.monotonic() - t, 3))
except (TimeoutError, socket.timeout):
    print("timeout")
"""

_REFUSE = """
import sys, time
from repmgr_vip.adapters import tcpreset
refuser = tcpreset.Refuser("h0", sys.argv[2], lambda: True, seconds=float(sys.argv[1]))
refuser.start(); print("ready", flush=True); refuser.join()
print(refuser.refused, refuser.examined)
"""

_NOISE = """
import socket, sys
for address in sys.argv[1:]:  # the VIP and the old holder's own address: UDP, nobody listens
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        for _ in range(20):
            s.sendto(b"noise", (address, 5432))
"""


@pytest.mark.parametrize("vip", ["192.0.2.100", "2001:db8::100"])
def test_a_client_with_the_old_mac_cached_is_refused_not_left_waiting(
        namespaces: tuple[str, str], vip: str) -> None:
    client, holder = namespaces
    src = str(Path(tcpreset.__file__).resolve().parents[2])
    connect = _pinned_client(client, holder, vip)  # the client's cache names the old holder
    assert connect(0.3) == "timeout"  # what a released node's kernel does: nothing
    refuser = subprocess.Popen([IP, "netns", "exec", holder, "env", f"PYTHONPATH={src}",
                                sys.executable, "-c", _REFUSE, "3", vip],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert refuser.stdout is not None and refuser.stdout.readline().strip() == "ready"
        own = "2001:db8::1" if ":" in vip else "192.0.2.1"
        subprocess.run([IP, "netns", "exec", client, sys.executable, "-c", _NOISE, vip, own],
                       check=True, timeout=30)
        answer = connect(2.0)
        assert answer.startswith("refused"), answer
        assert float(answer.split()[1]) < 0.5, answer
    finally:
        refuser.wait(timeout=10)
    assert refuser.stdout is not None
    refused, examined = (int(n) for n in refuser.stdout.read().split())
    assert refused >= 1
    assert examined == refused  # the 40 datagrams (and neighbour traffic) never reached Python


# --- sudo mode: the root helper a release starts, and its caller ---------------------------

_HELPER = """
import sys
sys.argv = ["repmgr-vip", "refuse-stale", "h0", sys.argv[1]]
from repmgr_vip.cli.quick import main
raise SystemExit(main())
"""


@pytest.mark.parametrize("told", ["go", ""])
def test_the_root_helper_answers_only_once_told_the_vip_is_gone(
        namespaces: tuple[str, str], told: str) -> None:
    """`repmgr-vip refuse-stale` as sudo runs it (the package's quick entry): ready first,
    silent until GO, then refusing; end of file instead of GO ends it without a word."""
    client, holder = namespaces
    vip = "192.0.2.100"
    src = str(Path(tcpreset.__file__).resolve().parents[2])
    connect = _pinned_client(client, holder, vip)
    helper = subprocess.Popen([IP, "netns", "exec", holder, "env", f"PYTHONPATH={src}",
                               sys.executable, "-c", _HELPER, vip], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert helper.stdout is not None and helper.stdout.readline().strip() == "ready"
        assert connect(0.3) == "timeout"  # ready, not yet told: it answers nothing
        assert helper.stdin is not None
        helper.stdin.write(told + "\n" if told else "")
        helper.stdin.close()
        answer = connect(1.0)
        if told:
            assert answer.startswith("refused") and float(answer.split()[1]) < 0.5, answer
            # the VIP comes back here: the helper stops at once (the kernel answers again)
            subprocess.run([IP, "-n", holder, "address", "add", f"{vip}/24", "dev", "h0"],
                           check=True, timeout=10)
            assert helper.wait(timeout=1.0) == 0
        else:
            assert answer == "timeout", answer
            assert helper.wait(timeout=5) == 0
    finally:
        if helper.poll() is None:
            helper.kill()
        helper.wait(timeout=10)


def _fake_helper(record: Path, first_line: str = "ready") -> list[str]:
    """A stand-in for `sudo -n repmgr-vip refuse-stale ...`: says `first_line`, then writes
    what it was told (or "EOF") to `record`."""
    code = (f"import sys; print({first_line!r}, flush=True); line = sys.stdin.readline(); "
            f"open({str(record)!r}, 'w').write(line.strip() if line else 'EOF')")
    return [sys.executable, "-c", code]


def test_the_caller_waits_for_ready_then_says_go_or_closes(tmp_path: Path) -> None:
    started, cancelled = tmp_path / "started", tmp_path / "cancelled"
    refusal = tcpreset.refusal_through([_fake_helper(started)])
    assert refusal is not None
    refusal.start()
    other = tcpreset.refusal_through([_fake_helper(cancelled)])
    assert other is not None
    other.cancel()
    for helper in [*refusal.helpers, *other.helpers]:
        assert helper.wait(timeout=10) == 0
    assert started.read_text() == "go"
    assert cancelled.read_text() == "EOF"


def test_a_helper_that_cannot_run_or_stays_silent_means_no_refusal(tmp_path: Path) -> None:
    """No sudo rule (sudo refuses at once), or a helper slower than the bound: the release
    goes on without a refusal, and nothing is left running."""
    import time

    began = time.monotonic()
    assert tcpreset.refusal_through([["false"]]) is None
    assert tcpreset.refusal_through([_fake_helper(tmp_path / "x", "what?")]) is None
    assert time.monotonic() - began < 2.0
    silent = [sys.executable, "-c", "import time; time.sleep(30)"]
    began = time.monotonic()
    assert tcpreset.refusal_through([silent], ready_within=0.3) is None
    assert time.monotonic() - began < 1.5
    lingering = [p for p in tcpreset._STARTED if p.args == silent]
    assert lingering and lingering[-1].wait(timeout=5) != 0  # terminated, not left behind
