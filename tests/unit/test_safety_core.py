"""Safety rules below the lab: fencing suspects, bounded queries, the journal, the marker."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from repmgr_vip.adapters import cluster, journal
from repmgr_vip.adapters.network import ProbeResult
from repmgr_vip.adapters.remote import RemoteResult
from repmgr_vip.adapters.statefiles import marker_age, marker_text
from repmgr_vip.app import fencing
from repmgr_vip.app.daemon import SingleFlight
from repmgr_vip.app.fencing import Fencing, fence_command_argv
from repmgr_vip.config.schema import load_config
from repmgr_vip.core.model import NodeRecord

FOREIGN = "02:de:ad:be:ef:01"


def _node(node_id: int, conninfo: str | None = None) -> NodeRecord:
    return NodeRecord(node_id, f"node{node_id}", "standby", True,
                      conninfo or f"host=192.0.2.{10 + node_id} user=repmgr", 0)


def test_placeholders_are_filled_in_one_pass() -> None:
    node = NodeRecord(3, "{host}", "standby", True, "host=192.0.2.13", 0)
    assert fence_command_argv("fence --name={node_name} --ip {host}", node) == [
        "fence", "--name={host}", "--ip", "192.0.2.13"]


def test_malformed_conninfo_in_cluster_data_makes_a_node_unreachable_not_a_crash() -> None:
    for bad in ("postgresql://192.0.2.1:99999/repmgr", "postgresql://[::1/repmgr", "host"):
        node = _node(7, bad)
        assert node.host == ""
        assert node.conninfo_error
        view = cluster.query_view(7, bad, 1.0)
        assert not view.reachable and view.error


@dataclass
class _Session:
    code: int
    early: bool = False

    def finished(self) -> bool:
        return True

    def result(self) -> RemoteResult:
        return RemoteResult("h", self.code, "released\n", "")

    def kill(self) -> None:
        pass


class _ForeignHostAnswers:
    """A segment where a host outside the cluster answers ARP for the VIP, always."""

    def probe(self) -> ProbeResult:
        time.sleep(0.01)
        return ProbeResult((FOREIGN,))


@pytest.fixture
def fence_log(write_config: Callable[..., Path], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path]:
    log = tmp_path / "fenced"
    cfg = write_config(extra=f'[fencing]\nfence_command = "/bin/sh -c \'echo $0 >> {log}\' '
                             '{node_name}"\nssh_command_timeout = 2\n')
    config = load_config(cfg, check_host=False)
    codes = {"192.0.2.11": 0, "192.0.2.12": 0, "192.0.2.13": 255}
    monkeypatch.setattr(fencing, "start_remote",
                        lambda _c, host, _argv: _Session(codes[host]))
    return config, log


def test_a_foreign_mac_never_gets_a_confirmed_node_fenced(fence_log: tuple[Any, Path]) -> None:
    config, log = fence_log
    round_ = Fencing(config, _ForeignHostAnswers(), [_node(1), _node(2)])  # type: ignore[arg-type]
    try:
        report = round_.wait()
    finally:
        round_.close()
    assert report.answered_by == (FOREIGN,)
    assert sorted(report.released) == ["node1", "node2"]
    assert report.fenced == []
    assert not log.exists(), log.read_text()


def test_only_the_node_that_did_not_confirm_is_fenced(fence_log: tuple[Any, Path]) -> None:
    config, log = fence_log
    round_ = Fencing(config, _ForeignHostAnswers(),  # type: ignore[arg-type]
                     [_node(1), _node(2), _node(3)])
    try:
        report = round_.wait()
    finally:
        round_.close()
    assert report.fenced == ["node3"]
    assert log.read_text().split() == ["node3"]
    assert report.unconfirmed == ["node3"]


def test_with_deadline_never_waits_longer_than_told() -> None:
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(cluster.QueryTimeout):
        cluster.with_deadline(lambda: release.wait(10), 0.2, "stalled server")
    assert time.monotonic() - started < 1.0
    release.set()


def test_single_flight_never_stacks_hung_calls() -> None:
    calls: list[float] = []
    gate = threading.Event()

    def slow() -> str:
        calls.append(time.monotonic())
        gate.wait(5)
        return "done"

    flight: SingleFlight[str] = SingleFlight(slow, "t")
    assert flight.call(0.05)[0] is None
    result, waited = flight.call(0.05)
    assert result is None and waited >= 0.05
    assert len(calls) == 1  # the second caller did not start another hung query
    gate.set()
    assert flight.call(1.0)[0] == "done"


def test_refused_is_judged_by_errno_not_by_words() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert not cluster.refuses_connections(f"host=127.0.0.1 port={port}")
    assert cluster.refuses_connections(f"host=127.0.0.1 port={port}")
    assert cluster.refuses_connections("host=/nonexistent-dir port=5432")
    assert not cluster.refuses_connections("host=db.example port=5432")  # never resolved
    assert not cluster.refuses_connections("host=127.0.0.1 port=99999")


def test_marker_age_uses_the_boot_clock(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    assert marker_age(marker) is None
    marker.write_text(marker_text("test"))
    age = marker_age(marker)
    assert age is not None and 0 <= age < 5
    data = json.loads(marker.read_text())
    data["boot_id"] = "another-boot"
    marker.write_text(json.dumps(data))
    assert marker_age(marker) == float("inf")  # from another boot: old, still a marker


def test_journal_lines_are_whole_and_readable_from_an_offset(tmp_path: Path) -> None:
    journal.record(tmp_path, "node1", "promote", "refuse", "why", alarm="conflict",
                   answered_by=[FOREIGN])
    entries, offset = journal.read_from(tmp_path, 0)
    assert [e["action"] for e in entries] == ["refuse"]
    assert entries[0]["inputs"]["answered_by"] == [FOREIGN]
    with journal.journal_path(tmp_path).open("a") as handle:
        handle.write('{"torn": ')  # a writer that died mid-line
    journal.record(tmp_path, "node1", "daemon", "keep", "fine")
    more, _ = journal.read_from(tmp_path, offset)
    assert [e.get("action") for e in more] == []  # the torn line hides what follows it...
    assert [e["action"] for e in journal.read(tmp_path)] == ["refuse"]


def test_journal_never_raises_on_an_unwritable_directory(tmp_path: Path) -> None:
    journal.record(tmp_path / "missing", "n", "s", "a", "r")
