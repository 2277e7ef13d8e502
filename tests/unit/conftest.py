"""Helpers for unit tests: a throwaway repmgr.conf and TOML config on disk."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

IP = shutil.which("ip") or "/usr/sbin/ip"

REPMGR_CONF = """\
# a repmgr.conf as a DBA writes it
node_id=2
node_name='pg-b'
conninfo='host=192.0.2.12 port=5432 user=repmgr dbname=repmgr connect_timeout=2'
data_directory='{datadir}'
pg_bindir='/usr/lib/postgresql/15/bin'
ssh_options='-q -o ConnectTimeout=5'   # trailing comment
reconnect_attempts=3
reconnect_interval = 2
"""


@pytest.fixture
def repmgr_conf(tmp_path: Path) -> Path:
    datadir = tmp_path / "15" / "main"
    datadir.mkdir(parents=True)
    path = tmp_path / "repmgr.conf"
    path.write_text(REPMGR_CONF.format(datadir=datadir))
    return path


@pytest.fixture
def write_config(tmp_path: Path, repmgr_conf: Path) -> Callable[..., Path]:
    def write(
        body: str | None = None,
        *,
        address: str = "192.0.2.115/24",
        interface: str = "lo",
        extra: str = "",
    ) -> Path:
        path = tmp_path / "repmgr-vip.toml"
        if body is None:
            body = (
                f'repmgr_config = "{repmgr_conf}"\n{extra}\n[vip]\n'
                f'address = "{address}"\ninterface = "{interface}"\n'
            )
        path.write_text(body)
        return path

    return write


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A state directory of the hooks' user: owned by postgres when the suite runs as root,
    reachable by postgres (tmp_path is root's 0700)."""
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:
        if str(parent).startswith("/tmp/") and parent.stat().st_uid == os.geteuid():
            parent.chmod(parent.stat().st_mode | 0o055)
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    if os.geteuid() == 0:
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no postgres account")
        os.chown(state, pg.pw_uid, pg.pw_gid)
    yield state


@contextlib.contextmanager
def veth_namespaces(tag: str, devices: tuple[str, str],
                    addresses: tuple[Sequence[str], Sequence[str]]) -> Iterator[tuple[str, str]]:
    """Two private network namespaces joined by a veth pair (no packet leaves them), named
    after `tag` and this process; `addresses` ("ip/len", nodad for IPv6) on each side. Root
    only (skips otherwise); deleted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("needs root for private network namespaces")
    names = (f"rvt-{tag}-a-{os.getpid()}", f"rvt-{tag}-b-{os.getpid()}")
    for name in names:
        subprocess.run([IP, "netns", "add", name], check=True, timeout=10)
    try:
        def inside(ns: str, *argv: str) -> None:
            subprocess.run([IP, "-n", ns, *argv], check=True, timeout=10)

        inside(names[0], "link", "add", devices[0], "type", "veth", "peer", "name", devices[1])
        inside(names[0], "link", "set", devices[1], "netns", names[1])
        for ns, dev, own in zip(names, devices, addresses, strict=True):
            for address in own:
                inside(ns, "address", "add", address, "dev", dev,
                       *(["nodad"] if ":" in address else []))
            inside(ns, "link", "set", dev, "up")
            inside(ns, "link", "set", "lo", "up")
        yield names
    finally:
        for name in names:
            subprocess.run([IP, "netns", "delete", name], timeout=10, check=False)


def link_mac(namespace: str, device: str) -> str:
    """The MAC of `device` in `namespace`, as `ip -j link` prints it."""
    shown = subprocess.run([IP, "-n", namespace, "-j", "link", "show", device],
                           capture_output=True, text=True, check=True, timeout=10).stdout
    return shown.split('"address":"')[1].split('"')[0]
