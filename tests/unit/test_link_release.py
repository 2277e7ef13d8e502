"""The warm link's remote release: the daemon's `release` op (hold first, then the one release
path, idempotent, the interface MAC in the reply) and LinkRelease's choice between the link
and ssh exec. The daemon is the real Daemon on the in-memory world (repmgr_vip.testing); the
socket is real and stands where the SSH master would forward it (sshmux.link_path)."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from repmgr_vip.adapters import control, sshmux
from repmgr_vip.adapters.link import LinkRelease, LinkSession
from repmgr_vip.app import hooks
from repmgr_vip.app.daemon import Daemon
from repmgr_vip.config import statepaths
from repmgr_vip.config.schema import Config
from repmgr_vip.core.decide import Action
from repmgr_vip.core.model import NodeRecord
from repmgr_vip.core.ports import ReleaseSession
from repmgr_vip.testing import FakeClock, FakeCluster, FakeFiles, FakeResult, write_configs

NAMES = ["pg1", "pg2", "pg3"]


@dataclass
class World:
    world: FakeCluster
    configs: dict[str, Config]
    daemon: Daemon  # pg1's, holding the VIP as primary

    def node(self, name: str) -> NodeRecord:
        return next(r for r in self.world.records() if r.node_name == name)


@pytest.fixture
def w() -> Iterator[World]:
    # short: the forwarded socket lives in the asker's private directory (a Unix socket path)
    directory = Path(tempfile.mkdtemp(prefix="rvlk", dir="/tmp"))
    clock = FakeClock()
    fake = FakeCluster(NAMES, clock)
    fake.promote("pg1", timeline=1)
    fake.hosts["pg1"].vip = True
    configs = write_configs(directory, NAMES)
    daemon = fake.daemon("pg1", configs["pg1"])
    yield World(fake, configs, daemon)
    if daemon.control is not None:
        daemon.control.close()
    shutil.rmtree(directory, ignore_errors=True)


def _serve(w: World, hands: hooks.Hands, request: dict[str, Any]) -> dict[str, Any]:
    """hooks.serve's reply, over a real socket pair."""
    ours, theirs = socket.socketpair()
    with control.Conversation(ours) as conv, control.Conversation(theirs) as reader:
        hooks.serve(w.configs["pg1"], hands, request, conv)
        reply = reader.receive(1.0)
    assert reply is not None
    return reply


def test_the_release_op_holds_the_daemon_off_before_it_removes_the_vip(w: World) -> None:
    host = w.world.hosts["pg1"]
    files = FakeFiles(w.world, "pg1")
    held_when_marked: list[bool] = []
    write = files.write_release_request

    def marked(reason: str) -> None:
        held_when_marked.append(host.vip)
        write(reason)

    files.write_release_request = marked  # type: ignore[method-assign]
    hands = hooks.Hands(w.world.address("pg1", w.configs["pg1"]), files.lock, via="daemon",
                        files=files)
    reply = _serve(w, hands, {"op": "release", "id": "a", "from": "pg2"})
    assert reply["ok"] and "raise" not in reply
    assert held_when_marked == [True]  # the hold was written while the VIP was still here
    assert not host.vip and host.release_request_at is not None
    assert reply["macs"] == [host.mac.lower()]
    [entry] = [e for e in host.journal if e["action"] == "release"]
    assert entry["via"] == "link" and entry["outcome"] == "released"

    again = _serve(w, hands, {"op": "release", "id": "b", "from": "pg2"})
    assert again["ok"] and "raise" not in again and not host.vip
    assert again["macs"] == [host.mac.lower()]
    # stale SYNs are refused after the release that removed the VIP, and only after it
    events = [what for _, name, what in w.world.events if name == "pg1"]
    assert events.count("refusing stale connections") == 1
    assert events.index("refusing stale connections") > events.index("remove")


def test_the_release_op_fails_cleanly_when_the_lock_is_busy(w: World) -> None:
    host = w.world.hosts["pg1"]
    files = FakeFiles(w.world, "pg1")
    hands = hooks.Hands(w.world.address("pg1", w.configs["pg1"]), files.lock, files=files)
    with files.hold("hook"):
        reply = _serve(w, hands, {"op": "release", "id": "a", "from": "pg2"})
    assert "raise" in reply  # the asker falls back to ssh exec (which waits for the lock)
    assert host.vip and host.release_request_at is None


def test_a_peer_release_through_the_daemon_keeps_it_from_adding_the_vip_back(w: World) -> None:
    """The daemon's own socket: the hold lands in its StateFiles, so its next cycle keeps
    off the VIP although this node is still primary (the new timeline does not show yet)."""
    assert w.daemon.serve_control()
    with control.connect(statepaths.control_socket(w.configs["pg1"].state_dir)) as conv:
        reply = conv.ask({"op": "release", "id": "x", "from": "pg2"}, 5.0)
    assert reply["ok"] and "raise" not in reply and reply["macs"]
    assert not w.world.hosts["pg1"].vip
    decision = w.daemon.cycle()
    assert decision is not None and decision.action is Action.KEEP
    assert not w.world.hosts["pg1"].vip


class RecordingSsh:
    """The fallback: records which nodes went to ssh exec."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def start_release(self, node: NodeRecord) -> ReleaseSession:
        self.asked.append(node.node_name)
        return _Done()


class _Done:
    def finished(self) -> bool:
        return True

    def result(self) -> FakeResult:
        return FakeResult(0, "released over ssh")

    def kill(self) -> None:
        pass


def _release(w: World, ssh: RecordingSsh) -> LinkSession:
    """pg2's daemon releasing pg1 through LinkRelease; waits for the link's part."""
    link = LinkRelease(lambda: w.configs["pg2"], lambda: ssh)
    session = link.start_release(w.node("pg1"))
    session.join(5.0)
    return session


def _forwarded(w: World) -> Path:
    """Where pg2's master would forward pg1's daemon socket."""
    path = sshmux.link_path(w.configs["pg2"], w.node("pg1"))
    assert path is not None
    return path


def test_the_link_releases_with_no_ssh_when_the_peer_daemon_answers(w: World) -> None:
    assert w.daemon.serve_control(_forwarded(w))
    ssh = RecordingSsh()
    session = _release(w, ssh)
    assert session.finished()
    result = session.result()
    assert result.ok and ssh.asked == []
    assert result.macs == (w.world.hosts["pg1"].mac.lower(),)
    assert not w.world.hosts["pg1"].vip


def test_no_forwarded_socket_means_ssh_exec(w: World) -> None:
    ssh = RecordingSsh()
    session = _release(w, ssh)
    assert session.finished() and session.result().ok
    assert ssh.asked == ["pg1"] and session.via == "ssh"
    assert session.result().macs == ()
    assert w.world.hosts["pg1"].vip  # the fake ssh did nothing: the link did not act


def _against(w: World, answer: Callable[[control.Conversation], None]
             ) -> tuple[LinkSession, RecordingSsh]:
    """pg2 releases pg1 against a stand-in daemon on the forwarded socket, which answers
    one connection with `answer`."""
    server = _listening(_forwarded(w))

    def serve() -> None:
        conn, _ = server.accept()
        with control.Conversation(conn) as conv:
            answer(conv)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ssh = RecordingSsh()
    try:
        session = _release(w, ssh)
        thread.join(5.0)
    finally:
        server.close()
    return session, ssh


def test_a_reply_that_is_not_ok_means_ssh_exec(w: World) -> None:
    def answer(conv: control.Conversation) -> None:
        conv.send({"hello": control.PROTOCOL, "pid": 1})
        conv.receive(2.0)
        conv.send({"ok": False, "error": "unknown op 'release'"})

    session, ssh = _against(w, answer)
    assert ssh.asked == ["pg1"] and session.finished() and session.result().ok


def test_no_greeting_within_the_bound_means_ssh_exec(w: World) -> None:
    """A hung peer daemon (or sshd refusing the forward: the socket accepts, nothing comes)."""
    path = _forwarded(w)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    ssh = RecordingSsh()
    session = _release(w, ssh)
    server.close()
    assert ssh.asked == ["pg1"] and session.finished()


def test_a_killed_session_starts_nothing(w: World) -> None:
    path = _forwarded(w)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    ssh = RecordingSsh()
    link = LinkRelease(lambda: w.configs["pg2"], lambda: ssh)
    session = link.start_release(w.node("pg1"))
    session.kill()
    session.join(5.0)
    server.close()
    assert ssh.asked == [] and session.finished() and not session.result().ok


def _listening(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    return server


def test_the_release_request_does_not_wait_for_the_greeting(w: World) -> None:
    """The request goes out with the connection: a peer that reads it before greeting (as
    the request, already there, is read the moment the greeting has gone) still answers, on
    the link, within the bound; each link round trip passes two ssh processes."""
    seen: list[dict[str, Any] | None] = []

    def answer(conv: control.Conversation) -> None:
        seen.append(conv.receive(2.0))  # before any greeting
        conv.send({"hello": control.PROTOCOL, "pid": 1})
        conv.send({"ok": True, "message": "removed", "macs": ["02:00:00:00:00:01"]})

    session, ssh = _against(w, answer)
    assert seen and seen[0] is not None and seen[0]["op"] == "release"
    assert ssh.asked == [] and session.via == "link" and session.result().ok
    assert session.result().macs == ("02:00:00:00:00:01",)


def test_a_prepared_link_is_greeted_before_the_release_is_asked(w: World) -> None:
    """Fencing asks the old primary last and prepares its link meanwhile: the connection is
    open and greeted before the request, which then travels alone (one round trip)."""
    server = _listening(_forwarded(w))
    greeted = threading.Event()
    events: list[str] = []

    def answer() -> None:
        conn, _ = server.accept()
        events.append("accepted")
        with control.Conversation(conn) as conv:
            conv.send({"hello": control.PROTOCOL, "pid": 1})
            greeted.set()
            request = conv.receive(3.0)
            events.append(f"request {request and request['op']}")
            conv.send({"ok": True, "message": "removed", "macs": []})

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    ssh = RecordingSsh()
    link = LinkRelease(lambda: w.configs["pg2"], lambda: ssh)
    link.prepare(w.node("pg1"))
    assert greeted.wait(5.0)
    events.append("asked")
    session = link.start_release(w.node("pg1"))
    session.join(5.0)
    thread.join(5.0)
    server.close()
    assert events == ["accepted", "asked", "request release"]
    assert ssh.asked == [] and session.via == "link" and session.result().ok


def test_a_prepared_link_that_failed_is_opened_again(w: World) -> None:
    """The peer's daemon was not there when the link was prepared; it is when asked."""
    ssh = RecordingSsh()
    link = LinkRelease(lambda: w.configs["pg2"], lambda: ssh)
    link.prepare(w.node("pg1"))  # nothing listens yet
    assert link._prepared["pg1"].done.wait(5.0)
    assert w.daemon.serve_control(_forwarded(w))
    session = link.start_release(w.node("pg1"))
    session.join(5.0)
    assert ssh.asked == [] and session.via == "link" and session.result().ok
    assert not w.world.hosts["pg1"].vip


class PreparingRecorder(RecordingSsh):
    """A RemoteRelease that can prepare links (as LinkRelease): records the nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared: list[str] = []

    def prepare(self, node: NodeRecord) -> None:
        self.prepared.append(node.node_name)


def test_a_looming_failover_prepares_a_link_to_every_peer(w: World) -> None:
    """While the primary answers, nothing is opened (a quiet steady state); once no primary
    answers, every cycle keeps a greeted link to each peer for the promotion to come."""
    daemon = w.world.daemon("pg2", w.configs["pg2"])
    recorder = PreparingRecorder()
    daemon.remote = recorder
    daemon.cycle()
    assert recorder.prepared == []
    w.world.hosts["pg1"].running = False  # the primary's PostgreSQL died
    w.world.clock.sleep(1.0)
    daemon.cycle()
    assert sorted(recorder.prepared) == ["pg1", "pg3"]
    assert recorder.asked == []  # prepared, nobody asked to release


FAKE_SSH = """#!/bin/sh
# records each call; masters answer for every host; the peer's `control-path` prints one
dir="$(dirname "$0")"
echo "$*" >> "$dir/calls"
for last; do :; done
case " $* " in
  *" -O check "*) exit 0 ;;
  *" -O forward "*) exit 0 ;;
  *" control-path"*) echo /srv/pg1/repmgr-vip-control.sock; exit 0 ;;
esac
exit 1
"""


def test_the_keeper_forwards_each_peer_once_its_master_is_up(w: World) -> None:
    """The peer's socket path is asked once (cached); the forward is (re)made while no
    daemon greets through it, and left alone once one does."""
    directory = w.configs["pg2"].state_dir
    fake = directory / "ssh"
    fake.write_text(FAKE_SSH)
    fake.chmod(0o755)
    config = w.configs["pg2"]
    config = dataclasses.replace(config, commands=dataclasses.replace(config.commands,
                                                                      ssh=str(fake)))
    pg1 = w.node("pg1")
    keeper = sshmux.MasterKeeper(lambda: config, lambda: [pg1.host], threading.Event(),
                                 peers=lambda: [pg1])
    local = sshmux.link_path(config, pg1)
    keeper.keep()
    keeper.keep()
    calls = (directory / "calls").read_text().splitlines()
    assert sum("control-path" in c for c in calls) == 1
    forwards = [c for c in calls if " -O forward " in c]
    assert len(forwards) == 2
    assert all(f" -L {local}:/srv/pg1/repmgr-vip-control.sock " in c for c in forwards)
    assert keeper.link_state[(pg1.host, "pg1")]  # nobody greets: not linked (and logged)

    assert w.daemon.serve_control(local)  # as if the forward now reached pg1's daemon
    keeper.keep()
    calls = (directory / "calls").read_text().splitlines()
    assert sum(" -O forward " in c for c in calls) == 2  # answered: nothing to redo
    assert keeper.link_state[(pg1.host, "pg1")] == ""
