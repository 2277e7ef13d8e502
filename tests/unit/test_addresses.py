"""Every address everywhere: status rows, metrics, sudoers and check cover the replica VIP
and IPv6 addresses; an unregistered replica_vip.prefer name is refused (exit 2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from repmgr_vip.adapters import cluster
from repmgr_vip.app import doctor, replica
from repmgr_vip.app.status import NodeStatus, address_rows, conflicts, render
from repmgr_vip.cli.main import main
from repmgr_vip.config.schema import load_config
from repmgr_vip.core.errors import ExitCode
from repmgr_vip.core.model import NodeRecord, NodeView

VIP4, VIP6 = "192.0.2.115/24", "2001:db8::115/64"
REP4, REP6 = "192.0.2.116/24", "2001:db8::116/64"


def _config(tmp_path: Path, repmgr_conf: Path, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'repmgr_config = "{repmgr_conf}"\n\n[vip]\naddress = ["{VIP4}", "{VIP6}"]\n'
                    f'interface = "lo"\n\n[replica_vip]\naddress = ["{REP4}", "{REP6}"]\n'
                    f"{extra}\n")
    return path


def _row(node_id: int, name: str, role: str, primary: bool, replica_held: bool) -> NodeStatus:
    return NodeStatus(node_id, name, "standby" if role != "primary" else "primary", role, 1,
                      True, primary, True, "", {VIP4: primary, VIP6: primary},
                      {REP4: replica_held, REP6: replica_held})


def test_status_prints_a_row_per_address_with_its_holder(tmp_path: Path,
                                                         repmgr_conf: Path) -> None:
    config = load_config(_config(tmp_path, repmgr_conf))
    rows = [_row(1, "pg-a", "primary", True, False), _row(2, "pg-b", "standby", False, True),
            _row(3, "pg-c", "standby", False, False)]
    found = conflicts(rows, config)
    assert found == []
    text = render(rows, found, address_rows(rows, config))
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert lines[VIP4] == ["primary", "pg-a"] and lines[VIP6] == ["primary", "pg-a"]
    assert lines[REP4] == ["replica", "pg-b"] and lines[REP6] == ["replica", "pg-b"]


def test_status_reports_a_replica_vip_on_two_nodes_or_on_the_primary(
        tmp_path: Path, repmgr_conf: Path) -> None:
    config = load_config(_config(tmp_path, repmgr_conf))
    two = [_row(1, "pg-a", "primary", True, False), _row(2, "pg-b", "standby", False, True),
           _row(3, "pg-c", "standby", False, True)]
    assert conflicts(two, config)  # status exits 1 on any conflict
    text = render(two, conflicts(two, config), address_rows(two, config))
    assert any(line.startswith(REP4) and "pg-b, pg-c" in line for line in text.splitlines())
    on_primary = [_row(1, "pg-a", "primary", True, True), _row(2, "pg-b", "standby", False, False)]
    assert conflicts(on_primary, config)
    allowed = load_config(_config(tmp_path, repmgr_conf, 'on_no_standby = "primary"'))
    assert conflicts(on_primary, allowed) == []


def test_metrics_label_the_replica_addresses_and_keep_the_old_names() -> None:
    from prometheus_client import generate_latest

    from repmgr_vip.app.metrics import Metrics

    metrics = Metrics("127.0.0.1", 0)
    metrics.addresses({VIP4: True})
    metrics.replica({REP4: True, REP6: True})
    text = generate_latest(metrics.registry).decode()
    assert f'repmgr_vip_replica_address_held{{address="{REP6}"}} 1.0' in text
    assert "repmgr_vip_replica_held 1.0" in text
    assert f'repmgr_vip_address_held{{address="{VIP4}"}} 1.0' in text
    assert "repmgr_vip_held " in text
    metrics.replica({REP4: False, REP6: True})  # half held is not held
    assert "repmgr_vip_replica_held 0.0" in generate_latest(metrics.registry).decode()


def test_sudoers_cover_every_address(tmp_path: Path, repmgr_conf: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(_config(tmp_path, repmgr_conf)), "sudoers"]) == ExitCode.OK
    rules = capsys.readouterr().out
    for address in (VIP4, VIP6, REP4, REP6):
        family = "-6" if ":" in address else "-4"
        escaped = address.replace(":", "\\:")  # sudoers escapes colons
        assert f"ip {family} address add {escaped} dev lo" in rules, address
        assert f"ip {family} address del {escaped} dev lo" in rules, address
    assert "192.0.2.116" in rules and "arping -U" in rules


def _nodes(*names: str) -> list[NodeRecord]:
    return [NodeRecord(i, name, "standby", True, f"host=192.0.2.{10 + i}", 100)
            for i, name in enumerate(names, 1)]


def test_daemon_refuses_a_prefer_name_that_is_not_registered(
        tmp_path: Path, repmgr_conf: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, repmgr_conf, 'prefer = ["pg-b", "pg-x"]')
    monkeypatch.setattr(cluster, "registered_nodes",
                        lambda *_a, **_k: _nodes("pg-a", "pg-b", "pg-c"))
    started: list[Any] = []

    def run(self: Any) -> int:
        started.append(self)
        return 0

    monkeypatch.setattr("repmgr_vip.app.daemon.Daemon.run", run)
    assert main(["-c", str(path), "daemon"]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "replica_vip.prefer" in err[0] and "pg-x" in err[0], err
    assert started == []  # nothing ran
    ok = _config(tmp_path, repmgr_conf, 'prefer = ["pg-c"]')
    assert main(["-c", str(ok), "daemon"]) == ExitCode.OK and len(started) == 1


def test_check_fails_on_an_unregistered_prefer_name_and_covers_the_replica_addresses(
        tmp_path: Path, repmgr_conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(_config(tmp_path, repmgr_conf, 'prefer = ["pg-x"]'))
    monkeypatch.setattr(cluster, "registered_nodes", lambda *_a, **_k: _nodes("pg-a", "pg-b"))
    results = list(doctor._check_replica(config))
    prefer = [r for r in results if r.name == "replica_vip.prefer"]
    assert len(prefer) == 1 and not prefer[0].ok and "pg-x" in prefer[0].detail
    subnets = [r for r in results if r.name == "replica VIP subnet"]
    assert len(subnets) == 2  # one per replica address, IPv4 and IPv6
    assert any("2001:db8::116" in r.name for r in results)  # the IPv6 prerequisites


def test_release_replica_asks_eligibility_only_when_held(
        tmp_path: Path, repmgr_conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`release --replica --unless-eligible` (what fencing sends): kept (exit 3) by an
    eligible holder, released by a holder that is not eligible."""
    config = load_config(_config(tmp_path, repmgr_conf))
    removed: list[bool] = []

    class Net:
        def holds(self) -> bool:
            return True

        def remove(self) -> bool:
            removed.append(True)
            return True

    monkeypatch.setattr(replica, "replica_network", lambda _c: Net())
    monkeypatch.setattr(replica, "want", lambda *_a, **_k: True)
    assert replica.release_unless_eligible(config)[0] is False and removed == []
    monkeypatch.setattr(replica, "want", lambda *_a, **_k: False)
    assert replica.release_unless_eligible(config)[0] is True and removed == [True]


class _Source:
    """A ClusterSource as the daemon's: this node's own record first, then the others."""

    def __init__(self, me: int, primary: int, rows: list[replica.Replication]) -> None:
        self.me, self.primary, self.rows = me, primary, rows
        names = {1: "pg-a", 2: "pg-b", 3: "pg-c"}
        records = [NodeRecord(i, names[i], "primary" if i == primary else "standby", True,
                              f"host=192.0.2.{10 + i}", 1) for i in names]
        self.records = [r for r in records if r.node_id == me] + [
            r for r in records if r.node_id != me]

    def local(self) -> NodeView:
        return self.views(self.records)[self.me]

    def nodes(self) -> list[NodeRecord]:
        return self.records

    def all_nodes(self) -> list[NodeRecord]:
        return self.records

    def views(self, nodes: Any) -> dict[int, NodeView]:
        return {r.node_id: NodeView(r.node_id, True, r.node_id != self.primary, 1)
                for r in nodes}

    def replication(self, primary: NodeRecord) -> list[replica.Replication]:
        assert primary.node_id == self.primary
        return self.rows


def test_every_node_agrees_on_the_holder_whatever_order_its_node_list_has(
        tmp_path: Path, repmgr_conf: Path) -> None:
    """The stable rule is the node id, not the order a daemon happens to list the nodes in
    (its own record first): else two standbys would each think they come first."""
    config = load_config(_config(tmp_path, repmgr_conf))
    rows = [replica.Replication("pg-b", "streaming", 0), replica.Replication("pg-c",
                                                                             "streaming", 0)]
    wants = {}
    for me, name in ((2, "pg-b"), (3, "pg-c")):
        mine = dataclasses.replace(config, repmgr=dataclasses.replace(
            config.repmgr, node_id=me, node_name=name))
        wants[name] = replica.want(mine, _Source(me, 1, rows), holds=False)
    assert wants == {"pg-b": True, "pg-c": False}


def test_keeper_fences_after_two_refused_periods_and_not_more_often_than_every_10_s(
        tmp_path: Path, repmgr_conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The address answers elsewhere while this node should hold it (the holder's daemon is
    dead): after FENCE_AFTER periods the fencing round runs, once per FENCE_EVERY."""
    config = load_config(_config(tmp_path, repmgr_conf))
    from repmgr_vip.app.fencing import FenceReport

    fenced: list[list[str]] = []

    def fence(_config: Any, _network: Any, nodes: Any, **_ports: Any) -> FenceReport:
        fenced.append([n.node_name for n in nodes])
        return FenceReport()

    monkeypatch.setattr(replica, "fence_replica", fence)

    class Net:
        def holds(self) -> bool:
            return False

        def probe(self) -> Any:
            from repmgr_vip.core.model import ProbeResult
            return ProbeResult(("02:00:00:00:00:0c",))

        def interface_state(self) -> Any:
            raise AssertionError("no metrics here")

    rows = [replica.Replication("pg-b", "streaming", 0)]
    keeper = replica.ReplicaKeeper(config, Net(), 1.0, _Source(2, 1, rows))  # type: ignore[arg-type]
    for _ in range(replica.FENCE_AFTER - 1):
        keeper.tick()
    assert fenced == []
    keeper.tick()
    assert fenced == [["pg-a", "pg-c"]]  # every other node: the holder is not known
    keeper.tick()
    assert len(fenced) == 1  # not again within FENCE_EVERY


def test_repmgr_conf_names_every_address(tmp_path: Path, repmgr_conf: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(_config(tmp_path, repmgr_conf)), "repmgr-conf"]) == ExitCode.OK
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#")]
    assert any(all(a in line for a in (VIP4, VIP6, REP4, REP6)) for line in header), header


def test_keeper_defers_when_an_eligible_standby_keeps_it(
        tmp_path: Path, repmgr_conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prefer` names this node but another eligible standby holds the replica VIP: that one
    keeps it (exit 3 over SSH), and this node stops fencing for a while instead of asking
    every node over SSH every 10 s; it still probes, and takes the address once it is free."""
    from repmgr_vip.app.fencing import FenceReport

    config = load_config(_config(tmp_path, repmgr_conf, 'prefer = ["pg-b"]'))
    rounds: list[int] = []
    probes: list[int] = []

    def fence(_config: Any, _network: Any, _nodes: Any, **ports: Any) -> FenceReport:
        rounds.append(1)
        ports["remote"].kept.add("pg-c")
        return FenceReport()

    monkeypatch.setattr(replica, "fence_replica", fence)

    class Net:
        def holds(self) -> bool:
            return False

        def probe(self) -> Any:
            from repmgr_vip.core.model import ProbeResult
            probes.append(1)
            return ProbeResult(("02:00:00:00:00:0c",))

    rows = [replica.Replication("pg-b", "streaming", 0),
            replica.Replication("pg-c", "streaming", 0)]
    keeper = replica.ReplicaKeeper(config, Net(), 1.0, _Source(2, 1, rows))  # type: ignore[arg-type]
    for _ in range(replica.FENCE_AFTER + 3):
        keeper.tick()
    assert len(rounds) == 1
    assert len(probes) == replica.FENCE_AFTER + 3  # it keeps probing every period
    later = keeper.last_fence + replica.FENCE_EVERY + 1  # a plain loop would fence again
    monkeypatch.setattr(replica.time, "monotonic", lambda: later)
    keeper.tick()
    assert len(rounds) == 1  # deferred: the eligible holder said it keeps it
    monkeypatch.setattr(replica.time, "monotonic", lambda: keeper.deferred_until + 1)
    keeper.tick()
    assert len(rounds) == 2  # the deferral is over
