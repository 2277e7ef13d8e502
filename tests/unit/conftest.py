"""Helpers for unit tests: a throwaway repmgr.conf and TOML config on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

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
