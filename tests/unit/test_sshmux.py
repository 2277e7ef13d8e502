"""SSH multiplexing: a private socket directory, options every ssh call shares, and the
daemon's keeper starting a master only where none answers."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from repmgr_vip.adapters import sshmux
from repmgr_vip.adapters.remote import ssh_argv
from repmgr_vip.config.schema import Config, load_config


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A state directory short enough for a Unix socket path (pytest's tmp_path may not be)."""
    path = Path(tempfile.mkdtemp(prefix="rvmux", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(write_config: Callable[..., Path], state_dir: Path, extra: str = "") -> Config:
    body = write_config().read_text()
    return load_config(write_config(f'state_dir = "{state_dir}"\n' + body + extra))


def _options(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]


def test_every_ssh_shares_a_master_in_a_private_directory(
        write_config: Callable[..., Path], short_dir: Path) -> None:
    config = _config(write_config, short_dir)
    argv = ssh_argv(config, "192.0.2.12", ["repmgr-vip", "release"])
    control = short_dir / f"repmgr-vip-ssh-{os.geteuid()}"
    options = _options(argv)
    assert "ControlMaster=auto" in options and "ControlPersist=60" in options
    assert f"ControlPath={control}/%C" in options
    # repmgr.conf's ssh_options still apply, and come first: the first value of an option wins
    assert argv.index("-q") < argv.index(f"ControlPath={control}/%C") < argv.index("--")
    assert "ConnectTimeout=5" in options
    info = os.lstat(control)
    assert stat.S_ISDIR(info.st_mode) and info.st_mode & 0o777 == 0o700
    assert info.st_uid == os.geteuid()


def test_a_planted_symlink_or_a_foreign_directory_turns_multiplexing_off(
        write_config: Callable[..., Path], short_dir: Path) -> None:
    config = _config(write_config, short_dir)
    control = short_dir / f"repmgr-vip-ssh-{os.geteuid()}"
    elsewhere = short_dir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    control.symlink_to(elsewhere)
    assert sshmux.control_options(config) == []
    assert "ControlMaster=auto" not in _options(ssh_argv(config, "192.0.2.12", ["true"]))
    control.unlink()
    control.mkdir(mode=0o700)
    if os.geteuid() == 0:  # someone else's directory: their sockets, not ours
        os.chown(control, 65534, 65534)
        assert sshmux.control_options(config) == []
        os.chown(control, 0, 0)
    control.chmod(0o755)  # ours but open: made private again before use
    assert sshmux.control_options(config) != []
    assert os.lstat(control).st_mode & 0o777 == 0o700


def test_a_socket_path_too_long_for_unix_sockets_turns_multiplexing_off(
        write_config: Callable[..., Path], short_dir: Path) -> None:
    deep = short_dir / ("d" * 60)
    deep.mkdir()
    assert sshmux.control_options(_config(write_config, deep)) == []
    assert sshmux.control_options(_config(write_config, short_dir)) != []


def test_a_dba_can_turn_it_off_with_controlpath_none(
        write_config: Callable[..., Path], short_dir: Path, repmgr_conf: Path) -> None:
    text = repmgr_conf.read_text().replace("-q -o ConnectTimeout=5",
                                           "-q -o ControlPath=none")
    repmgr_conf.write_text(text)
    argv = ssh_argv(_config(write_config, short_dir), "192.0.2.12", ["true"])
    options = _options(argv)
    assert options.index("ControlPath=none") < next(
        i for i, o in enumerate(options) if o.startswith("ControlPath=/"))


FAKE_SSH = """#!/bin/sh
# records each call; "-O check" answers only for hosts listed in $DIR/up
dir="$(dirname "$0")"
echo "$*" >> "$dir/calls"
for last; do :; done
case " $* " in
  *" -O check "*) grep -qx "$last" "$dir/up" 2>/dev/null && exit 0; exit 255 ;;
  *" -f -N "*) echo "$last" >> "$dir/up"; exit 0 ;;
esac
exit 1
"""


def test_keeper_starts_a_master_only_where_none_answers(
        write_config: Callable[..., Path], short_dir: Path) -> None:
    fake = short_dir / "ssh"
    fake.write_text(FAKE_SSH)
    fake.chmod(0o755)
    (short_dir / "up").write_text("192.0.2.13\n")  # a master some hook left running
    config = _config(write_config, short_dir, f'\n[commands]\nssh = "{fake}"\n')
    hosts = ["192.0.2.12", "192.0.2.13", "192.0.2.12", ""]
    keeper = sshmux.MasterKeeper(lambda: config, lambda: hosts, threading.Event())
    keeper.keep()
    for _, started in keeper.starting.values():
        started.wait(5)
    calls = (short_dir / "calls").read_text().splitlines()
    starts = [c for c in calls if " -f -N " in c]
    assert len(starts) == 1 and starts[0].endswith("192.0.2.12")
    before = len(calls)
    keeper.keep()  # both answer now: checks only
    calls = (short_dir / "calls").read_text().splitlines()
    assert len(calls) == before + 2 and all(" -O check " in c for c in calls[before:])
