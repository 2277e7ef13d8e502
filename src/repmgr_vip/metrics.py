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
        self.loop = Histogram("repmgr_vip_loop_seconds", "duration of one cycle", registry=r,
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
        self.lease_left = Gauge("repmgr_vip_lease_remaining_seconds",
                                "VIP lifetime left before this cycle's renewal (vip.lease > 0; "
                                "0: not held, +Inf: permanent)", registry=r)
        self.lease_failures = Counter("repmgr_vip_lease_renewal_failures",
                                      "lease renewals that failed or came too late", registry=r)

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

    def lease_remaining(self, seconds: float) -> None:
        self.lease_left.set(seconds)

    def lease_failure(self) -> None:
        self.lease_failures.inc()

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
        self.loop.observe(seconds)
