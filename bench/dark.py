"""The dark window and the ARP answer latency, as functions over lab observations.

Dark window: the time during a failover when no node answers for the VIP. A client whose TCP
SYN (or ARP request) falls into it is answered by nobody and waits a full retransmission
(1 s); a SYN to an old holder whose PostgreSQL is dead gets a reset at once and the client
retries in milliseconds. Seen two ways: holders on the nodes' interfaces (a sampler reading
every node over netlink), and answers in the client namespace (bench/arpwatch.py asking every
5 ms, reporting the last answer before a silence).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lab import INTERFACE, VIP_IP, Lab, Node
from tests.integration.vipconf import PYTHON


def dark_from_holders(samples: Sequence[tuple[float, Sequence[str]]], after: float,
                      new: str) -> float | None:
    """Seconds between the last sample where another node held the VIP and the first (after
    `after`) where `new` did, if a sample with no holder lay between; else 0. None if `new`
    never held it. Resolution: the sampling interval."""
    last_other: tuple[float, bool] | None = None  # (time, an empty sample since)
    for t, holders in samples:
        if new in holders and t >= after:
            if last_other is None:
                return None
            return t - last_other[0] if last_other[1] else 0.0
        if holders:
            last_other = (t, False)
        elif last_other is not None:
            last_other = (last_other[0], True)
    return None


def dark_from_client(frames: Sequence[tuple[float, str | None, float]], after: float,
                     new_mac: str) -> float | None:
    """From the client's ARP poller's lines (time, MAC or None for a silence, last answer
    before it): the first answer from `new_mac` after `after` minus the last answer from
    anyone before it; 0 when the answers changed MAC with no silence between."""
    last: float | None = None
    silent = False
    for t, mac, last_answer in frames:
        if mac is None:
            last, silent = last_answer, True
            continue
        if t >= after and mac == new_mac:
            if last is None:
                return None
            return t - last if silent else 0.0
        last, silent = t, False
    return None


PROBE_SNIPPET = r"""
import ipaddress, json, select, sys, time
from repmgr_vip.adapters import arp
iface, vip, rounds, proofs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
own = arp.interface_mac(iface)
target = ipaddress.IPv4Address(vip).packed
frame = arp.arp_frame(arp.REQUEST, own, b"\0" * 4, arp.ZERO_MAC, target)
latencies = []
with arp.packet_socket(iface, arp.ETH_P_ARP) as sock:
    for _ in range(rounds):
        sent = time.perf_counter()
        sock.send(frame)
        deadline = sent + 0.5
        while time.perf_counter() < deadline:
            if not select.select([sock], [], [], deadline - time.perf_counter())[0]:
                break
            parsed = arp.parse_arp(sock.recv(2048))
            if parsed and parsed[0] == arp.REPLY and parsed[2] == target:
                latencies.append(time.perf_counter() - sent)
                break
        time.sleep(0.005)
found = 0
took = []
for _ in range(proofs):
    t = time.perf_counter()
    found += bool(arp.lan_probe(iface, vip))
    took.append(time.perf_counter() - t)
print(json.dumps({"latencies": latencies, "rounds": rounds, "proofs": proofs,
                  "found": found, "proof_seconds": took}))
"""


def proof_check(lab: Lab, prober: Node, rounds: int = 200, proofs: int = 100,
                ip: str = VIP_IP) -> dict[str, Any]:
    """From `prober` (as root, its namespace): the time a holder takes to answer one RFC 5227
    probe, `rounds` times, and how many of `proofs` LAN proofs (arp.lan_probe) saw it."""
    result = lab.run(prober, [PYTHON, "-c", PROBE_SNIPPET, INTERFACE, ip, str(rounds),
                              str(proofs)], user="root", timeout=120)
    data: dict[str, Any] = json.loads(result.stdout)
    lat = sorted(data["latencies"])
    if lat:
        data["latency_ms"] = {"median": 1000 * lat[len(lat) // 2],
                              "p99": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                              "max": 1000 * lat[-1]}
    data["answered"] = len(lat)
    return data
