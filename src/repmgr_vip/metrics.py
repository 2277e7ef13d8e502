"""Prometheus metrics for the daemon (prometheus-client, imported only by the daemon)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from repmgr_vip.log import LOG

if TYPE_CHECKING:
    from repmgr_vip.decide import Decision, Snapshot

ROLES = ("primary", "standby", "down")


class Metrics:
    def __init__(self, address: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.address = address
        self.port = port
        self.registry = CollectorRegistry()
        r = self.registry
        self.held = Gauge("repmgr_vip_held", "1 if this node holds the VIP", registry=r)
        self.role = Gauge("repmgr_vip_role", "1 for the local role", ["role"], registry=r)
        self.peers = Gauge("repmgr_vip_peers_reachable", "other nodes answering", registry=r)
        self.peers_total = Gauge("repmgr_vip_peers", "other registered nodes", registry=r)
        self.decision = Info("repmgr_vip_last_decision", "last decision", registry=r)
        self.conflicts = Counter("repmgr_vip_conflicts", "another host answered for our VIP",
                                 registry=r)
        self.actions = Counter("repmgr_vip_actions", "actions taken", ["action"], registry=r)
        self.split_brain = Gauge("repmgr_vip_split_brain",
                                 "1 while another primary is on this node's timeline", registry=r)
        self.split_brain_cycles = Counter("repmgr_vip_split_brain_cycles",
                                          "cycles that saw two primaries on one timeline",
                                          registry=r)
        self.loop = Histogram("repmgr_vip_loop_seconds", "duration of one cycle", registry=r,
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))

    def start(self) -> None:
        if self.port <= 0:
            return
        from prometheus_client import start_http_server

        try:
            start_http_server(self.port, addr=self.address, registry=self.registry)
        except OSError as exc:
            LOG.error("metrics endpoint %s:%d not started: %s", self.address, self.port, exc)

    def action(self, name: str) -> None:
        self.actions.labels(action=name).inc()

    def conflict(self) -> None:
        self.conflicts.inc()

    def observe(self, decision: Decision, snapshot: Snapshot, holds: bool,
                seconds: float) -> None:
        self.held.set(1 if holds else 0)
        local = snapshot.local
        role = "down" if not local.reachable else ("standby" if local.in_recovery else "primary")
        for name in ROLES:
            self.role.labels(role=name).set(1 if name == role else 0)
        self.peers.set(sum(1 for p in snapshot.peers if p.view.reachable))
        self.peers_total.set(len(snapshot.peers))
        self.decision.info({"action": decision.action.value, "reason": decision.reason[:200]})
        split = decision.alarm == "split-brain"
        self.split_brain.set(1 if split else 0)
        if split:
            self.split_brain_cycles.inc()
        self.loop.observe(seconds)
