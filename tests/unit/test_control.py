"""The hooks' fast path: VIP steps handed to the running daemon over its control socket, and
the hook doing the step itself whenever the daemon is absent, silent, slow or refuses.

The daemon here is the real Daemon wired to the in-memory world (repmgr_vip.testing); the
socket, the credentials check and the hooks' client are real.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from repmgr_vip.adapters import control, journal
from repmgr_vip.app import hooks
from repmgr_vip.app.daemon import Daemon
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config, load_config
from repmgr_vip.core.errors import ExitCode
from repmgr_vip.core.model import NodeView
from repmgr_vip.testing import FakeClock, FakeCluster, FakeFiles, FakeRemote, write_configs

NAMES = ["pg1", "pg2", "pg3"]


@dataclass
class Node:
    world: FakeCluster
    config: Config
    daemon: Daemon

    @property
    def holds(self) -> bool:
        return self.world.hosts["pg1"].vip

    def own_hands(self) -> hooks.Hands:
        """What the hook itself acts with (the same fake host, a lock of its own)."""
        files = FakeFiles(self.world, "pg1")
        ports = {"remote": FakeRemote(self.world, "pg1"), "clock": self.world.clock,
                 "fence_runner": self.world.fence_runner("pg1"), "prober": self.world.prober}
        return hooks.Hands(self.world.address("pg1", self.config),
                           lambda _timeout: files.hold("hook"), fencing=ports)

    def entries(self, source: str) -> list[dict[str, Any]]:
        return [dict(e) for e in journal.read(self.config.state_dir) if e["source"] == source]

    def refused(self) -> float:
        value = self.daemon.metrics.registry.get_sample_value(
            "repmgr_vip_actions_total", {"action": "control_refused"})
        return value or 0.0


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """pg1, primary and holding the VIP, with its daemon built (not yet serving)."""
    clock = FakeClock()
    world = FakeCluster(NAMES, clock)
    world.promote("pg1", timeline=1)
    world.hosts["pg1"].vip = True
    configs = write_configs(tmp_path, NAMES)
    daemon = world.daemon("pg1", configs["pg1"])
    yield Node(world, configs["pg1"], daemon)
    if daemon.control is not None:
        daemon.control.close()


def _socket(node: Node) -> Path:
    return statepaths.control_socket(node.config.state_dir)


def test_a_hook_hands_its_step_to_the_daemon(node: Node) -> None:
    assert node.daemon.serve_control()
    message = hooks.fence_self(node.config, own=node.own_hands())
    assert not node.holds
    assert "released" in message
    [entry] = node.entries("fence-self")
    assert entry["inputs"]["via"] == "daemon"
    assert statepaths.self_fence_marker(node.config.state_dir).exists()
    assert _socket(node).stat().st_mode & 0o777 == control.SOCKET_MODE


def test_without_a_daemon_the_hook_does_the_step_itself(node: Node) -> None:
    started = time.monotonic()
    hooks.fence_self(node.config, own=node.own_hands())
    assert time.monotonic() - started < control.CONNECT_BOUND
    assert not node.holds
    [entry] = node.entries("fence-self")
    assert entry["inputs"] == {"via": "hook", "daemon": "not running"}


def test_a_stale_socket_of_a_dead_daemon_is_no_daemon(node: Node) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(_socket(node)))  # bound, never listening: what a killed daemon leaves
    hooks.fence_self(node.config, own=node.own_hands())
    assert not node.holds
    assert node.entries("fence-self")[0]["inputs"]["via"] == "hook"


def test_a_stopped_daemon_costs_the_hook_at_most_the_greeting_bound(node: Node) -> None:
    """A SIGSTOPped daemon: the kernel completes connect() into its backlog, nobody accepts."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stopped:
        stopped.bind(str(_socket(node)))
        stopped.listen(8)
        started = time.monotonic()
        hooks.fence_self(node.config, own=node.own_hands())
        took = time.monotonic() - started
    assert control.CONNECT_BOUND <= took < control.CONNECT_BOUND + 0.15, took
    assert not node.holds
    assert node.entries("fence-self")[0]["inputs"]["via"] == "hook"


def test_a_daemon_that_greets_but_never_replies_costs_the_step_deadline(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    def hang(request: dict[str, Any], conv: control.Conversation, peer: control.Peer) -> None:
        time.sleep(3)

    server = control.ControlServer(_socket(node), hang, allowed_uids={os.geteuid()},
                                   on_refused=lambda peer: None)
    server.bind()
    server.start()
    monkeypatch.setattr(hooks, "step_wait", lambda config, fencing: 0.3)
    try:
        started = time.monotonic()
        hooks.fence_self(node.config, own=node.own_hands())
        took = time.monotonic() - started
    finally:
        server.close()
    assert 0.3 <= took < 0.6, took
    assert not node.holds
    [entry] = node.entries("fence-self")
    assert entry["inputs"]["via"] == "hook"
    assert "gave no reply" in entry["inputs"]["daemon"]


def test_a_failing_daemon_step_makes_the_hook_do_it(node: Node) -> None:
    def broken(request: dict[str, Any], conv: control.Conversation, peer: control.Peer) -> None:
        raise RuntimeError("a bug in the daemon")

    server = control.ControlServer(_socket(node), broken, allowed_uids={os.geteuid()},
                                   on_refused=lambda peer: None)
    server.bind()
    server.start()
    try:
        hooks.fence_self(node.config, own=node.own_hands())
    finally:
        server.close()
    assert not node.holds
    assert node.entries("fence-self")[0]["inputs"]["via"] == "hook"


def test_an_idle_server_sleeps_yet_stops_at_once(node: Node) -> None:
    """The accept loop is not woken by a timeout every fraction of a second (an idle daemon's
    CPU); close() still ends it at once instead of after the backstop."""
    server = control.ControlServer(_socket(node), lambda *a: None,
                                   allowed_uids={os.geteuid()}, on_refused=lambda peer: None)
    server.bind()
    assert server.sock is not None and (server.sock.gettimeout() or 0) >= 1.0
    server.start()
    time.sleep(0.1)  # in accept()
    started = time.monotonic()
    server.close()
    server.join(2.0)
    assert not server.is_alive()
    assert time.monotonic() - started < 0.5


def test_a_peer_of_another_uid_is_refused_and_counted(node: Node) -> None:
    seen: list[control.Peer] = []
    server = control.ControlServer(_socket(node), lambda *a: None,
                                   allowed_uids={os.geteuid() + 4242}, on_refused=seen.append)
    server.bind()
    server.start()
    try:
        with pytest.raises(control.Unavailable, match="refused"):
            control.connect(_socket(node))
    finally:
        server.close()
    assert [(p.uid, p.pid) for p in seen] == [(os.geteuid(), os.getpid())]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_the_daemon_serves_only_its_own_user_and_root(node: Node) -> None:
    assert node.daemon.serve_control()
    # pytest's directories are private to root: reach the socket through an open directory
    directory = os.open(node.config.state_dir, os.O_PATH)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                control.connect(Path(f"/proc/self/fd/{directory}/{_socket(node).name}"))
                verdict = "served"
            except control.Unavailable as exc:
                verdict = exc.reason
        except BaseException as exc:
            verdict = f"child failed: {exc}"
        os.write(write, verdict.encode())
        os._exit(0)
    os.close(write)
    os.close(directory)
    os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        verdict = pipe.read()
    assert verdict.startswith("refused"), verdict
    assert node.refused() == 1
    assert node.holds  # a refused peer changes nothing
    hooks.fence_self(node.config, own=node.own_hands())  # our own user still is served
    assert node.entries("fence-self")[0]["inputs"]["via"] == "daemon"


def _ask(node: Node, request: dict[str, Any]) -> dict[str, Any]:
    with control.connect(_socket(node)) as conv:
        return conv.ask(request, 5.0)


def test_a_replayed_request_runs_once_and_gets_the_same_reply(node: Node) -> None:
    assert node.daemon.serve_control()
    request = {"op": "fence-self", "id": "hook-1"}
    first = _ask(node, request)
    node.world.hosts["pg1"].vip = True  # if the replay ran again, it would release this
    again = _ask(node, request)
    assert again == first
    assert node.holds
    assert len(node.entries("fence-self")) == 1
    # a hook run again (a new request) after being killed halfway is safe too: same state
    _ask(node, {"op": "fence-self", "id": "hook-2"})
    _ask(node, {"op": "fence-self", "id": "hook-3"})
    assert not node.holds
    assert [e["outcome"] for e in node.entries("fence-self")] == ["released", "released",
                                                                   "not held"]


def test_malformed_and_unknown_requests_change_nothing(node: Node) -> None:
    assert node.daemon.serve_control()
    assert _ask(node, {"op": "format-disk"})["ok"] is False
    with control.connect(_socket(node)) as conv:
        conv.sock.sendall(b"[1, 2]\n")
        assert conv.receive(1.0) is None and conv.closed
    with control.connect(_socket(node)) as conv:
        conv.sock.sendall(b"x" * (control.MAX_LINE + 10))
        assert conv.receive(1.0) is None and conv.closed
    assert node.holds
    hooks.fence_self(node.config, own=node.own_hands())  # the daemon still serves
    assert node.entries("fence-self")[0]["inputs"]["via"] == "daemon"


def test_a_second_daemon_does_not_steal_a_live_socket(node: Node) -> None:
    assert node.daemon.serve_control()
    other = node.world.daemon("pg1", node.config)
    assert not other.serve_control()
    hooks.fence_self(node.config, own=node.own_hands())
    assert node.entries("fence-self")[0]["inputs"]["via"] == "daemon"
    assert node.daemon.control is not None
    node.daemon.control.close()
    assert not _socket(node).exists()


def test_lock_held_elsewhere_is_the_hooks_own_error(node: Node) -> None:
    """A step the daemon could not take the lock for fails as the hook's would: same code."""
    assert node.daemon.serve_control()
    node.world.hosts["pg1"].lock_holder = "someone"
    reply = _ask(node, {"op": "fence-self", "id": "x"})
    assert reply["ok"] is True and reply["code"] == ExitCode.FAILED
    with pytest.raises(hooks.CommandFailed):
        hooks.fence_self(node.config, own=node.own_hands())
    assert node.holds


def test_event_through_the_daemon_releases_on_a_standby_event(node: Node) -> None:
    assert node.daemon.serve_control()
    event = hooks.Event(1, "node_rejoin", True, None)
    message = hooks.handle_event(node.config, event, own=node.own_hands())
    assert "released" in message
    assert not node.holds
    assert node.entries("event node_rejoin")[0]["inputs"]["via"] == "daemon"


# --- promote: two exchanges on one connection ------------------------------------------------


class FakeRun:
    """`repmgr standby promote` as the hook starts it: PostgreSQL leaves recovery at once."""

    def __init__(self, world: FakeCluster, status: int) -> None:
        self.world = world
        self.status = status
        self.process = self
        if status == 0:
            world.promote("pg1", timeline=2)

    def poll(self) -> int | None:
        return self.status

    def finish(self) -> int:
        return self.status


def _promotable(node: Node, monkeypatch: pytest.MonkeyPatch, status: int = 0) -> list[str]:
    """pg1 a standby without the VIP, pg2 the old primary still holding it; the hook's
    repmgr and PostgreSQL queries answered by the world. Returns who started repmgr."""
    world = node.world
    world.hosts["pg1"].vip = False
    world.hosts["pg1"].role = "standby"
    world.promote("pg2", timeline=1)
    world.hosts["pg2"].vip = True
    records = world.records()
    starts: list[str] = []

    def start_repmgr(config: Config, *args: str) -> FakeRun:
        starts.append(" ".join(args))
        return FakeRun(world, status)

    def local_view(config: Config, timeout: float = 3.0) -> NodeView:
        host = world.hosts["pg1"]
        return NodeView(1, reachable=True, in_recovery=host.role != "primary",
                        timeline=host.timeline)

    from repmgr_vip.adapters import cluster, repmgr

    monkeypatch.setattr(repmgr, "start_repmgr", start_repmgr)
    monkeypatch.setattr(cluster, "local_view", local_view)
    monkeypatch.setattr(cluster, "checkpoint", lambda config, timeout: None)
    monkeypatch.setattr(hooks, "_other_nodes", lambda config: [r for r in records
                                                               if r.node_name != "pg1"])
    return starts


def test_promote_through_the_daemon(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    starts = _promotable(node, monkeypatch)
    assert node.daemon.serve_control()
    status = hooks.promote(node.config, own=node.own_hands())
    assert status == 0
    assert starts == ["standby promote --log-to-file"]  # the hook ran repmgr, once
    assert node.holds and not node.world.hosts["pg2"].vip
    by = {e["action"]: e for e in node.entries("promote")}
    assert by["acquire"]["inputs"]["via"] == "daemon"
    assert by["repmgr-promote"]["inputs"]["via"] == "daemon"
    assert by["repmgr-promote"]["inputs"]["hook_ms"] is not None
    assert not node.world.violations


def test_promote_without_a_daemon_fences_itself(node: Node,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    starts = _promotable(node, monkeypatch)
    assert hooks.promote(node.config, own=node.own_hands()) == 0
    assert starts == ["standby promote --log-to-file"]
    assert node.holds and not node.world.hosts["pg2"].vip
    by = {e["action"]: e for e in node.entries("promote")}
    assert by["acquire"]["inputs"]["via"] == "hook"
    assert by["repmgr-promote"]["inputs"]["daemon"] == "not running"


def test_promote_returns_repmgrs_status_and_takes_no_vip_when_it_fails(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    _promotable(node, monkeypatch, status=6)
    assert node.daemon.serve_control()
    assert hooks.promote(node.config, own=node.own_hands()) == 6
    assert not node.holds
    assert [e["action"] for e in node.entries("promote")][-1] == "promote-failed"


def test_a_refused_promotion_through_the_daemon_is_exit_3_and_no_repmgr(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    starts = _promotable(node, monkeypatch)
    node.world.foreign.add("02:ff:00:00:00:01")  # a host outside the cluster holds the VIP
    assert node.daemon.serve_control()
    assert hooks.promote(node.config, own=node.own_hands()) == ExitCode.REFUSED
    assert starts == []
    assert not node.holds
    assert node.entries("promote")[-1]["action"] == "refuse"


def test_the_daemon_keeps_cycling_while_it_serves(node: Node,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A step runs in the request's own thread and holds the VIP lock: the cycle goes on
    meanwhile and does not act on the VIP until the step let go of the lock."""
    entered, go_on = threading.Event(), threading.Event()
    real_step = hooks.fence_self_step

    def slow_step(config: Config, hands: hooks.Hands) -> str:
        with hands.lock(1.0):
            entered.set()
            go_on.wait(10)
        return real_step(config, hands)

    monkeypatch.setattr(hooks, "fence_self_step", slow_step)
    assert node.daemon.serve_control()
    node.world.hosts["pg1"].vip = False  # removed by hand: the cycle wants to re-add it
    hook = threading.Thread(target=hooks.fence_self, args=(node.config,),
                            kwargs={"own": node.own_hands()})
    hook.start()
    assert entered.wait(5)
    started = time.monotonic()
    decision = node.daemon.cycle()
    assert time.monotonic() - started < 1.0
    assert decision is not None and decision.action.value == "acquire"
    assert not node.holds  # the step holds the lock: the cycle may not act now
    go_on.set()
    hook.join(10)
    assert node.entries("fence-self")[0]["inputs"]["via"] == "daemon"


def test_request_lines_are_json_objects_one_per_line(node: Node) -> None:
    assert node.daemon.serve_control()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(_socket(node)))
        raw.sendall(json.dumps({"op": "fence-self", "id": "raw"}).encode() + b"\n")
        raw.settimeout(5)
        data = b""
        while data.count(b"\n") < 2:
            data += raw.recv(4096)
    hello, reply = (json.loads(line) for line in data.splitlines()[:2])
    assert hello == {"hello": control.PROTOCOL, "pid": os.getpid()}
    assert reply["ok"] is True and "released" in reply["message"]


def test_the_promote_hook_process_delegates_and_journals_its_time(
        node: Node, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The installed command, as repmgrd runs it, against a serving daemon: it starts
    repmgr (a stand-in that exits 0) only after the daemon's verdict, and journals how long
    it took from its own process start. Prints the median of a few runs."""
    _promotable(node, monkeypatch)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "repmgr"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    conf = node.config.repmgr.path
    conf.write_text(conf.read_text() + f"repmgr_bindir='{bindir}'\n")
    config = load_config(node.config.path, check_host=False)
    node.daemon.config = config
    assert node.daemon.serve_control()
    command = Path(sys.executable).parent / "repmgr-vip"
    for _ in range(5):
        node.world.hosts["pg1"].role = "standby"  # each run promotes pg1 again
        node.world.hosts["pg1"].vip = False
        done = subprocess.run([str(command), "-c", str(config.path), "promote"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    runs = [e["inputs"] for e in node.entries("promote") if e["action"] == "repmgr-promote"]
    assert len(runs) == 5 and all(r["via"] == "daemon" for r in runs), runs
    median = {k: statistics.median(r[k] for r in runs)
              for k in ("asked_ms", "verdict_ms", "hook_ms")}
    print(f"\npromote hook, daemon path, fake cluster: median {median} (of 5)")
