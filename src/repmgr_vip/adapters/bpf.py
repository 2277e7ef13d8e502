"""Classic BPF filters for packet sockets: the kernel drops what Python would only discard.

A packet socket bound to an Ethernet protocol receives every frame of that protocol on the
interface. On a busy LAN that is thousands of frames a second copied to the process and
looked at in Python, right when a failover needs the CPU. A filter keeps only the frames the
reader can act on; the reader still checks each one itself (the filter is a pre-sieve, never
the only check).

A program here is a list of checks, each a load and a value it must equal: a frame passes
only if every check holds. `Check.mask` (and-ed before comparing), `Check.none_of` (bits
that must be clear) and `Check.after_ipv4_header` (a load after the IPv4 header, whose
length varies) cover what the callers need; `equal` checks a run of bytes (a MAC, an
address).
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>

# opcodes (<linux/filter.h>): class | size | mode
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_B_IND = 0x50  # A = frame[X + k]
LDX_B_MSH = 0xB1  # X = 4 * (frame[k] & 0x0f): an IPv4 header's length
ALU_AND_K = 0x54
JEQ_K, JSET_K = 0x15, 0x45
RET_K = 0x06

WORD, HALF, BYTE = 4, 2, 1
_LOAD = {WORD: LD_W_ABS, HALF: LD_H_ABS, BYTE: LD_B_ABS}
ACCEPT = 0x40000  # bytes of a passing frame to keep: all of it
ETHERNET_HEADER = 14  # bytes; IPv4's first byte (version, header length) comes next
DROP = -1  # a jump target while assembling


class Check(NamedTuple):
    """frame[offset:offset+size] (big-endian), and-ed with mask, must equal value.

    after_ipv4_header: offset counts from the end of the IPv4 header instead of the frame's
    start. none_of: instead of equality, none of these bits may be set (value unused).
    A NamedTuple, not a dataclass: the root helper `refuse-stale` imports this module while
    a release waits for it, and dataclasses costs it 7 ms of imports."""

    offset: int
    size: int
    value: int = 0
    mask: int | None = None
    after_ipv4_header: bool = False
    none_of: int = 0


def equal(offset: int, data: bytes) -> list[Check]:
    """Checks that frame[offset:offset+len(data)] is `data`: words, then a half, then a byte."""
    checks = []
    at = 0
    for size in (WORD, HALF, BYTE):
        while len(data) - at >= size:
            checks.append(Check(offset + at, size, int.from_bytes(data[at:at + size], "big")))
            at += size
    return checks


def assemble(checks: list[Check]) -> list[tuple[int, int, int, int]]:
    """The instructions (code, jt, jf, k): each failed check jumps to the final `ret 0`."""
    body: list[tuple[int, int, int, int]] = []  # a jump of DROP: to the final `ret 0`
    for check in checks:
        if check.after_ipv4_header:
            if check.size != BYTE:
                raise ValueError("only single bytes are loaded after the IPv4 header")
            body.append((LDX_B_MSH, 0, 0, ETHERNET_HEADER))  # X = the IPv4 header's length
            body.append((LD_B_IND, 0, 0, ETHERNET_HEADER + check.offset))
        else:
            body.append((_LOAD[check.size], 0, 0, check.offset))
        if check.mask is not None:
            body.append((ALU_AND_K, 0, 0, check.mask))
        if check.none_of:
            body.append((JSET_K, DROP, 0, check.none_of))  # any of the bits set: drop
        else:
            body.append((JEQ_K, 0, DROP, check.value))  # not equal: drop
    drop_at = len(body) + 1  # after the body and its `ret ACCEPT`
    program = [(code, drop_at - at - 1 if jt == DROP else jt,
                drop_at - at - 1 if jf == DROP else jf, k)
               for at, (code, jt, jf, k) in enumerate(body)]
    program += [(RET_K, 0, 0, ACCEPT), (RET_K, 0, 0, 0)]
    if len(program) > 255:  # jumps are 8 bits; our programs are a few dozen instructions
        raise ValueError("filter too long")
    return program


def attach(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Installs `program` on `sock` (the kernel copies it); OSError if the kernel refuses."""
    import ctypes  # lazy: the daemon only, never the hooks' start-up

    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
