"""State files: one owner and mode whoever runs first, no symlinks followed, atomic writes."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from repmgr_vip.adapters import statefiles
from repmgr_vip.adapters.lock import vip_lock
from repmgr_vip.config import statepaths

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs as postgres too)")


@pytest.fixture
def postgres(shared_dir: Path) -> pwd.struct_passwd:
    return pwd.getpwnam("postgres")  # shared_dir skipped the test if there is none


def _as_postgres(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/usr/bin/setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_every_state_file_name_comes_from_one_place(tmp_path: Path) -> None:
    names = {f(tmp_path).name for f in (
        statepaths.lock_file, statepaths.daemon_state_file, statepaths.self_fence_marker,
        statepaths.nodes_cache, statepaths.announcer_pid_file, statepaths.default_log_file)}
    assert names == {"repmgr-vip.lock", "repmgr-vip-daemon.json", "repmgr-vip-self-fenced",
                     "repmgr-vip-nodes.json", "repmgr-vip-announce.pid", "repmgr-vip.log"}


def test_write_atomic_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "repmgr-vip-daemon.json"
    link.symlink_to(victim)
    statefiles.write_atomic(link, '{"pid": 1}')
    assert victim.read_text() == "precious\n"
    assert not link.is_symlink() and link.read_text() == '{"pid": 1}'
    assert stat.S_IMODE(link.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repmgr-vip-daemon.json", "victim"]


def test_write_atomic_leaves_no_temp_file_and_keeps_the_old_one_on_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "repmgr-vip-nodes.json"
    statefiles.write_atomic(path, "old")

    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        statefiles.write_atomic(path, "new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["repmgr-vip-nodes.json"]
    assert path.read_text() == "old"


def test_read_text_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("12345\n")
    link = tmp_path / "repmgr-vip-announce.pid"
    link.symlink_to(target)
    with pytest.raises(OSError):
        statefiles.read_text(link)
    assert statefiles.remove(link) is True
    assert target.exists() and statefiles.remove(link) is False


@root_only
def test_write_atomic_as_root_gives_the_file_to_the_state_dir_owner(
        shared_dir: Path, postgres: pwd.struct_passwd) -> None:
    old = os.umask(0o077)
    try:
        statefiles.write_atomic(shared_dir / "repmgr-vip-daemon.json", "{}")
    finally:
        os.umask(old)
    info = (shared_dir / "repmgr-vip-daemon.json").stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (postgres.pw_uid, 0o644)


@root_only
def test_root_with_umask_077_creates_a_lock_postgres_can_take(
        shared_dir: Path, postgres: pwd.struct_passwd) -> None:
    lock = shared_dir / "repmgr-vip.lock"
    old = os.umask(0o077)
    try:
        with vip_lock(lock, 1.0):
            pass
    finally:
        os.umask(old)
    info = lock.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (postgres.pw_uid, 0o644)
    taken = _as_postgres(
        "import sys; from pathlib import Path; from repmgr_vip.adapters.lock import vip_lock\n"
        f"with vip_lock(Path({str(lock)!r}), 1.0): print('locked')")
    assert taken.returncode == 0 and taken.stdout.strip() == "locked", taken.stderr


@root_only
def test_root_repairs_a_root_owned_0600_lock_from_an_older_version(
        shared_dir: Path, postgres: pwd.struct_passwd) -> None:
    lock = shared_dir / "repmgr-vip.lock"
    lock.touch(mode=0o600)
    os.chown(lock, 0, 0)
    lock.chmod(0o600)
    with vip_lock(lock, 1.0):
        pass
    info = lock.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (postgres.pw_uid, 0o644)


@root_only
def test_postgres_locked_out_exits_2_naming_the_file(
        shared_dir: Path, repmgr_conf: Path) -> None:
    lock = shared_dir / "repmgr-vip.lock"
    lock.touch()
    os.chown(lock, 0, 0)
    lock.chmod(0o600)
    conf = shared_dir.parent / "repmgr.conf"
    conf.write_text(repmgr_conf.read_text())
    conf.chmod(0o644)
    config = shared_dir.parent / "repmgr-vip.toml"
    config.write_text(f'repmgr_config = "{conf}"\nstate_dir = "{shared_dir}"\n'
                      '[vip]\naddress = "192.0.2.115/24"\ninterface = "lo"\n')
    config.chmod(0o644)
    result = _as_postgres("import sys; from repmgr_vip.cli.main import main\n"
                          f"sys.exit(main(['-c', {str(config)!r}, 'release']))")
    assert result.returncode == 2, result.stderr
    assert str(lock) in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_log_file_symlink_is_not_followed(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from repmgr_vip.adapters.log import LOG, setup_logging

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "repmgr-vip.log"
    link.symlink_to(victim)
    setup_logging(link, "pg-b", to_stderr=False)
    LOG.warning("hello")
    assert victim.read_text() == "precious\n"
    assert "cannot write log file" in capsys.readouterr().err


@root_only
def test_log_created_by_root_stays_writable_for_postgres(
        shared_dir: Path, postgres: pwd.struct_passwd) -> None:
    log = shared_dir / "repmgr-vip.log"
    old = os.umask(0o077)
    try:
        statefiles.open_append(log).close()
    finally:
        os.umask(old)
    info = log.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (postgres.pw_uid, 0o644)


@root_only
def test_root_never_hands_over_a_hard_linked_lock(shared_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from repmgr_vip.core.errors import ConfigError

    secret = shared_dir.parent / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    os.link(secret, shared_dir / "repmgr-vip.lock")
    with pytest.raises(ConfigError), vip_lock(shared_dir / "repmgr-vip.lock", 1.0):
        pass
    info = secret.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
    assert secret.read_text() == "root only\n"
