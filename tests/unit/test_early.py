"""adapters/early.py: the quick start's early release, from the plan a standby's hooks keep
to the child the full CLI's fencing round adopts (and nothing it cannot trust)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from repmgr_vip.adapters import early, process
from repmgr_vip.config import statepaths

# run as the hooks' user (postgres when the suite runs as root): what a standby's
# start-repmgrd hook keeps, what its promote hook's quick start sends, what the round adopts
ROUND_TRIP = """
import json, os, sys
from pathlib import Path
from repmgr_vip.adapters import early, process
from repmgr_vip.app.fencing import SshRelease, keep_first_releases
from repmgr_vip.config.schema import load_config
from repmgr_vip.core.model import NodeRecord

config = load_config(Path(sys.argv[1]), check_host=False)
def node(i, kind):
    return NodeRecord(node_id=i, node_name=f"node{i}", conninfo=f"host=h{i}",
                      node_type=kind, active=True, upstream_node_id=1)
old, other = node(1, "primary"), node(3, "standby")
keep_first_releases(config, [old, other])
control = str(config.state_dir / "repmgr-vip-control.sock")
children = early.start_releases(control, str(config.path))
process.adopt(children)
release = SshRelease(config)
first, second = release.start_release(old), release.start_release(other)
print(json.dumps({"started": len(children), "early": release.early,
                  "first": first.result().stdout, "first_ok": first.result().ok,
                  "second_early": second.started.early, "second": second.result().stdout,
                  "plan_mode": oct(os.stat(config.state_dir /
                                   "repmgr-vip-early-release.json").st_mode & 0o777)}))
"""


def _as_hooks_user(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    prefix = ["/usr/bin/setpriv", "--reuid=postgres", "--regid=postgres",
              "--init-groups"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=60, check=False, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)})


def test_the_first_release_goes_out_early_and_the_round_adopts_exactly_it(
        write_config: Callable[..., Path], repmgr_conf: Path, shared_dir: Path) -> None:
    fake_ssh = shared_dir.parent / "fake-ssh"
    fake_ssh.write_text('#!/bin/sh\necho "pid $$ args $*"\n')
    fake_ssh.chmod(0o755)
    repmgr_conf.chmod(0o644)
    config = write_config(extra=f'state_dir = "{shared_dir}"\n'
                                f'[commands]\nssh = "{fake_ssh}"\n')
    config.chmod(0o644)
    result = _as_hooks_user(ROUND_TRIP, str(config))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["started"] == 1  # only the node the list names primary
    assert seen["early"] == ["node1"] and seen["first_ok"]
    assert "h1 " in seen["first"] and "release" in seen["first"]
    assert not seen["second_early"] and "h3 " in seen["second"]  # asked the usual way
    assert seen["plan_mode"] == "0o644"


def _plan(state: Path, config: str, argvs: list[list[str]], **extra: object) -> Path:
    path = state / statepaths.EARLY_RELEASE
    path.write_text(json.dumps({"config": config, "control": str(state / statepaths.CONTROL_SOCKET),
                                "release": argvs, **extra}))
    path.chmod(0o644)
    return path


SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o755)
    yield directory
    process.stop_unadopted()


def _control(state: Path) -> str:
    return str(state / statepaths.CONTROL_SOCKET)


def test_a_plan_that_cannot_be_trusted_or_is_not_for_this_hook_line_starts_nothing(
        state: Path) -> None:
    plan = _plan(state, "/etc/repmgr-vip.toml", [SLEEPER])
    assert early.start_releases(_control(state), "/etc/other.toml") == []  # another config
    assert early.start_releases(str(state / "other.sock"), "/etc/repmgr-vip.toml") == []
    plan.chmod(0o664)  # others may write it
    assert early.start_releases(_control(state), "/etc/repmgr-vip.toml") == []
    plan.chmod(0o644)
    state.chmod(0o775)  # others may replace it
    assert early.start_releases(_control(state), "/etc/repmgr-vip.toml") == []
    state.chmod(0o755)
    target = state / "target.json"
    plan.rename(target)
    plan.symlink_to(target)  # never through a symlink
    assert early.start_releases(_control(state), "/etc/repmgr-vip.toml") == []
    plan.unlink()
    _plan(state, "/etc/repmgr-vip.toml", [["relative-ssh", "h1"], [], [1, 2], "ssh h1"])
    assert early.start_releases(_control(state), "/etc/repmgr-vip.toml") == []
    plan.write_text("{not json")
    assert early.start_releases(_control(state), "/etc/repmgr-vip.toml") == []


def test_a_child_nobody_adopts_is_stopped_and_a_different_command_line_is_not_adopted(
        state: Path) -> None:
    _plan(state, "/etc/repmgr-vip.toml", [SLEEPER])
    children = early.start_releases(_control(state), "/etc/repmgr-vip.toml")
    assert len(children) == 1
    (_, pid, _), = children
    process.adopt(children)
    other = process.start([*SLEEPER[:-1], SLEEPER[-1] + " "])  # one space differs
    assert not other.early
    other.kill()
    assert process.alive(pid)
    process.stop_unadopted()
    with pytest.raises(ChildProcessError):  # killed and reaped
        os.waitpid(pid, os.WNOHANG)


def test_an_adopted_child_reads_like_any_started_one(state: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('out'); sys.stderr.write('err\\n'); "
            "sys.exit(3)"]
    _plan(state, "/etc/repmgr-vip.toml", [argv])
    process.adopt(early.start_releases(_control(state), "/etc/repmgr-vip.toml"))
    started = process.start(argv)
    assert started.early
    assert started.wait(10) == 3
    assert started.output_text().split() == ["out", "err"]
    started.close()
    _plan(state, "/etc/repmgr-vip.toml", [SLEEPER])
    process.adopt(early.start_releases(_control(state), "/etc/repmgr-vip.toml"))
    child = process.start(SLEEPER)
    with pytest.raises(process.CommandFailed):
        child.wait(0.1)
    begun = time.monotonic()
    child.kill()
    assert child.process.poll() == -9 and time.monotonic() - begun < 5


def test_the_child_gets_no_descriptor_of_ours_and_its_own_session(state: Path) -> None:
    kept = os.open(state, os.O_RDONLY)  # inheritable, as repmgrd's would be
    os.set_inheritable(kept, True)
    try:
        argv = [sys.executable, "-c", "import os; print(sorted(int(f) for f in "
                "os.listdir('/proc/self/fd')), os.getsid(0) == os.getpid())"]
        _plan(state, "/etc/repmgr-vip.toml", [argv])
        process.adopt(early.start_releases(_control(state), "/etc/repmgr-vip.toml"))
        started = process.start(argv)
        assert started.early and started.wait(10) == 0
        fds, own_session = started.output_text().rsplit(" ", 1)
        assert kept not in json.loads(fds) and own_session.strip() == "True"
    finally:
        os.close(kept)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process with caps")
def test_no_early_start_from_a_process_whose_children_could_inherit_capabilities(
        state: Path) -> None:
    _plan(state, "/etc/repmgr-vip.toml", [SLEEPER])
    code = ("import sys; from repmgr_vip.adapters import early; "
            "print(len(early.start_releases(sys.argv[1], '/etc/repmgr-vip.toml')))")
    result = subprocess.run(
        ["/usr/bin/setpriv", "--inh-caps=+net_admin", "--ambient-caps=+net_admin",
         sys.executable, "-c", code, _control(state)], capture_output=True, text=True,
        timeout=60, check=False, env={"PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


@pytest.mark.skipif(os.geteuid() != 0, reason="runs as root only")
def test_root_never_writes_the_plan(tmp_path: Path) -> None:
    early.write_plan(tmp_path, tmp_path / "c.toml", [["/usr/bin/ssh", "h1"]])
    assert not (tmp_path / statepaths.EARLY_RELEASE).exists()
